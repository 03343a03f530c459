# services.clawos.agents: agents declared on a ClawOS host. Each becomes a oneshot unit,
# clawos-agent-<name>, that enables its skills and starts its VM once the host is up,
# and stops the VM when stopped. Needs services.clawos (host.nix).
{ config, lib, pkgs, ... }:

let
  cfg = config.services.clawos;
  inherit (lib) mkOption mkIf types;
  clawos = "${cfg.package}/bin/clawos";
  state = toString cfg.stateDir;
  # The launcher refuses other names too; this says so at evaluation, by option.
  validName = name: builtins.match "[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?" name != null;
  agentUnit = name: a: {
    name = "clawos-agent-${name}";
    value = {
      description = "ClawOS agent ${name}";
      after = [ "clawos-vm-launcher.service" ] ++ lib.optional (a.skills != [ ]) "clawos-skill-manager.service";
      requires = [ "clawos-vm-launcher.service" ];
      wantedBy = [ "clawos.target" ];
      environment = {
        CLAWOS_STATE_DIR = state;
        CLAWOS_LAUNCHER_URL = "http://${cfg.launcher.addr}";
        CLAWOS_SKILLS_URL = "http://${cfg.skills.addr}";
      };
      # vm-launcher may not be listening yet right after its start: try again.
      unitConfig.StartLimitIntervalSec = 0;
      serviceConfig = {
        Type = "oneshot";
        RemainAfterExit = true;
        Restart = "on-failure";
        RestartSec = "5s";
        ExecStart = map (s: "${clawos} skill enable ${s} ${name}") a.skills
          ++ [ (lib.concatStringsSep " " ([ clawos "vm" "start" name "--model" a.model "--mem" (toString a.mem) ]
            ++ lib.optionals (a.image != null) [ "--image" a.image ])) ];
        ExecStop = "${clawos} vm stop ${name}";
      };
    };
  };
in
{
  options.services.clawos.agents = mkOption {
    default = { };
    description = "Agents to run on this host, by VM name.";
    type = types.attrsOf (types.submodule {
      options = {
        model = mkOption {
          type = types.str;
          default = "claude-sonnet-4-5";
          description = "The model the agent asks for (through inference-proxy).";
        };
        mem = mkOption {
          type = types.ints.positive;
          default = 512;
          description = "The VM's memory, MiB.";
        };
        image = mkOption {
          type = types.nullOr types.str;
          default = null;
          description = "A registered image's name (null: the launcher's default).";
        };
        skills = mkOption {
          type = types.listOf types.str;
          default = [ ];
          description = "Installed skills to enable for this agent.";
        };
      };
    });
  };

  config = mkIf (cfg.enable && cfg.agents != { }) {
    assertions = lib.mapAttrsToList (name: _: {
      assertion = validName name;
      message = "services.clawos.agents.${name}: a VM name is 1-63 of a-z, 0-9 and '-', not starting or ending with '-'";
    }) cfg.agents;
    systemd.services = lib.mapAttrs' agentUnit cfg.agents;
  };
}
