# services.clawos: one ClawOS host on NixOS. The options mirror clawos.toml (the same
# keys, camelCase; crates/host/clawos.toml documents each); the units are the package's
# own (packaging/systemd, installed under ${package}/lib/systemd/system through
# systemd.packages), so their hardening is the same as on any other distribution:
# this module only sets each one's command line from the options.
{ config, lib, pkgs, ... }:

let
  cfg = config.services.clawos;
  inherit (lib) mkOption mkEnableOption mkIf types;
  toggle = default: description: mkOption {
    type = types.bool;
    inherit default description;
  };
  addr = default: description: mkOption {
    type = types.str;
    inherit default description;
  };
  bin = name: "${cfg.package}/bin/${name}";
  http = a: "http://${a}";
  # A word of ExecStart= as systemd reads it: quoted when it holds anything but plain
  # characters, `%` and `$` doubled (specifiers, variables). The credential paths this
  # module writes itself keep their ${CREDENTIALS_DIRECTORY}.
  escape = w:
    if builtins.match "[A-Za-z0-9_./:=,@+-]+" w != null || builtins.match "[$][{]CREDENTIALS_DIRECTORY[}]/[a-z-]+" w != null then w
    else "\"" + builtins.replaceStrings [ "\\" "\"" "%" "$" ] [ "\\\\" "\\\"" "%%" "$$" ] w + "\"";
  cmd = words: lib.concatStringsSep " " (map escape words);
  # Each unprivileged daemon's user (packaging/systemd/clawos.sysusers).
  daemonUsers = {
    clawos-identity = "identity";
    clawos-proxy = "proxy";
    clawos-skills = "skills";
    clawos-orchestrator = "orchestrator";
    clawos-control-plane = "control-plane";
  };
  # What every unit gets besides its command line: the state directory it may write.
  common = extra: lib.recursiveUpdate {
    wantedBy = [ "clawos.target" ];
    serviceConfig.ReadWritePaths = [ "" state ];
  } extra;
  state = toString cfg.stateDir;
  flagList = flag: values: lib.concatMap (v: [ flag v ]) values;
in
{
  options.services.clawos = {
    enable = mkEnableOption "ClawOS: AI agents in signed, verified microVMs";
    package = mkOption {
      type = types.package;
      description = "The clawos package (this flake's packages.default).";
    };
    stateDir = mkOption {
      type = types.path;
      default = "/var/lib/clawos";
      description = "Where keys, images, VMs and audit trails are kept (state_dir).";
    };
    identity.addr = addr "127.0.0.1:2082" "identity-manager's address (loopback).";
    proxy = {
      addr = addr "127.0.0.1:11435" "inference-proxy's address (loopback).";
      anthropicUrl = mkOption {
        type = types.str;
        default = "https://api.anthropic.com";
        description = "Anthropic's API, or anything speaking its wire format.";
      };
      anthropicKeyFile = mkOption {
        # A string, not a path: a path would be copied into the world-readable store.
        type = types.str;
        default = "/etc/clawos/credentials/anthropic-api-key";
        description = "File with the Anthropic API key, handed to inference-proxy alone (LoadCredential).";
      };
      rpm = mkOption {
        type = types.ints.positive;
        default = 60;
        description = "Requests a minute per agent.";
      };
    };
    skills = {
      enable = toggle true "Run skill-manager (sandboxed WebAssembly skills over MCP).";
      addr = addr "127.0.0.1:2083" "skill-manager's address (loopback).";
      resolve = mkOption {
        type = types.listOf types.str;
        default = [ ];
        description = "NAME=IP names the skills' requests resolve statically.";
      };
      agentCallsPerMinute = mkOption {
        type = types.ints.positive;
        default = 60;
        description = "Skill calls per agent per minute.";
      };
    };
    monitor = {
      enable = toggle true "Run monitor-daemon (eBPF audit, CEF to a SIEM; root, BTF).";
      addr = addr "127.0.0.1:2084" "monitor-daemon's address (loopback).";
      syslog = mkOption {
        type = types.listOf types.str;
        default = [ ];
        description = "SIEM receivers: tcp://, udp:// or tls://IP:PORT.";
      };
    };
    launcher = {
      addr = addr "127.0.0.1:2080" "vm-launcher's address (loopback).";
      image = mkOption {
        type = types.nullOr types.path;
        default = null;
        description = "The default image bundle (null: <stateDir>/images/default).";
      };
      signingPubkey = mkOption {
        type = types.nullOr types.str;
        default = null;
        description = "The image signing public key (64 hex digits); only images it signed boot.";
      };
      backend = mkOption {
        type = types.enum [ "auto" "qemu" "firecracker" ];
        default = "auto";
        description = "The hypervisor.";
      };
    };
    orchestrator = {
      enable = toggle true "Run the orchestrator (workflows).";
      addr = addr "127.0.0.1:2081" "orchestrator's address (loopback).";
    };
    controlPlane = {
      enable = toggle false "Run the control plane, the one listener meant for the network.";
      addr = addr "0.0.0.0:8080" "control-plane's address.";
      tlsNames = mkOption {
        type = types.listOf types.str;
        default = [ "localhost" "127.0.0.1" ];
        description = "Names its self-signed certificate is for.";
      };
    };
  };

  config = mkIf cfg.enable {
    systemd.packages = [ cfg.package ];
    users.users = lib.mapAttrs (user: dir: {
      isSystemUser = true;
      group = "clawos";
      home = "${state}/${dir}";
    }) daemonUsers;
    users.groups.clawos = { };
    systemd.tmpfiles.rules = [ "d ${state} 0755 root root -" ]
      ++ lib.mapAttrsToList (user: dir: "d ${state}/${dir} 0700 ${user} clawos -") daemonUsers
      ++ [
        "d ${state}/logs 0700 root root -"
        "d ${state}/monitor 0700 root root -"
        "d ${state}/launcher 0700 root root -"
      ];
    systemd.targets.clawos.wantedBy = [ "multi-user.target" ];
    # Each unit's command line from the options (the empty entry resets the package's).
    systemd.services = {
      clawos-identity-manager = common {
        serviceConfig.ExecStart = [ "" (cmd [ (bin "identity-manager") "--addr" cfg.identity.addr "--state-dir" state ]) ];
      };
      clawos-inference-proxy = common {
        serviceConfig.LoadCredential = [ "" "anthropic-api-key:${cfg.proxy.anthropicKeyFile}" ];
        serviceConfig.ExecStart = [ "" (cmd [ (bin "inference-proxy") "--addr" cfg.proxy.addr "--state-dir" state
          "--issuer" (http cfg.identity.addr) "--anthropic-url" cfg.proxy.anthropicUrl "--rpm" (toString cfg.proxy.rpm) ]) ];
      };
      clawos-vm-launcher = common {
        serviceConfig.ExecStart = [ "" (cmd ([ (bin "vm-launcher") "--addr" cfg.launcher.addr "--state-dir" state
          "--identity-url" (http cfg.identity.addr) "--inference-proxy-url" (http cfg.proxy.addr)
          "--backend" cfg.launcher.backend ]
          ++ lib.optionals (cfg.launcher.image != null) [ "--image" (toString cfg.launcher.image) ]
          ++ lib.optionals (cfg.launcher.signingPubkey != null) [ "--signing-pubkey" cfg.launcher.signingPubkey ]
          ++ lib.optionals cfg.skills.enable [ "--skill-manager-url" (http cfg.skills.addr) ]
          ++ lib.optionals cfg.monitor.enable [ "--monitor-url" (http cfg.monitor.addr) ])) ];
      };
    } // (if !cfg.skills.enable then {
      # The package's clawos.target wants it: masked, not merely left unconfigured.
      clawos-skill-manager.enable = false;
    } else {
      clawos-skill-manager = common {
        serviceConfig.ExecStart = [ "" (cmd ([ (bin "skill-manager") "--addr" cfg.skills.addr "--state-dir" state
          "--issuer" (http cfg.identity.addr) "--agent-calls-per-minute" (toString cfg.skills.agentCallsPerMinute) ]
          ++ lib.optionals (cfg.launcher.signingPubkey != null) [ "--signing-pubkey" cfg.launcher.signingPubkey ]
          ++ flagList "--resolve" cfg.skills.resolve)) ];
      };
    }) // (if !cfg.monitor.enable then {
      clawos-monitor.enable = false;
    } else {
      clawos-monitor = common {
        serviceConfig.ExecStart = [ "" (cmd ([ (bin "monitor-daemon") "--addr" cfg.monitor.addr "--state-dir" state ]
          ++ flagList "--syslog" cfg.monitor.syslog)) ];
      };
    }) // (if !cfg.orchestrator.enable then {
      clawos-orchestrator.enable = false;
    } else {
      clawos-orchestrator = common {
        serviceConfig.LoadCredential = [ "" "launcher-token:${state}/launcher/admin.token" ];
        serviceConfig.ExecStart = [ "" (cmd [ (bin "orchestrator") "--addr" cfg.orchestrator.addr "--state-dir" state
          "--launcher-url" (http cfg.launcher.addr) "--launcher-token" "\${CREDENTIALS_DIRECTORY}/launcher-token" ]) ];
      };
    }) // lib.optionalAttrs cfg.controlPlane.enable {
      clawos-control-plane = common {
        wantedBy = [ "multi-user.target" ];
        serviceConfig.LoadCredential = [ ""
          "launcher-token:${state}/launcher/admin.token"
          "identity-token:${state}/identity/service.token"
          "proxy-token:${state}/proxy/admin.token"
        ] ++ lib.optional cfg.orchestrator.enable "orchestrator-token:${state}/orchestrator/admin.token"
          ++ lib.optional cfg.monitor.enable "monitor-token:${state}/monitor/admin.token";
        serviceConfig.ExecStart = [ "" (cmd ([ (bin "control-plane") "--addr" cfg.controlPlane.addr "--state-dir" state
          "--tls" "self-signed" "--tls-name" (lib.concatStringsSep "," cfg.controlPlane.tlsNames)
          "--launcher-url" (http cfg.launcher.addr) "--launcher-token" "\${CREDENTIALS_DIRECTORY}/launcher-token"
          "--identity-url" (http cfg.identity.addr) "--proxy-url" (http cfg.proxy.addr) ]
          ++ lib.optionals cfg.monitor.enable [ "--monitor-url" (http cfg.monitor.addr) ]
          ++ lib.optionals cfg.orchestrator.enable [ "--orchestrator-url" (http cfg.orchestrator.addr) ])) ];
      };
    };
  };
}
