# Evaluates ClawOS's NixOS modules (host.nix and agent.nix) with the settings given as
# JSON, through the module-system stand-in: the declared options, the units' command
# lines and what else the modules produce, as JSON for tests/e2e/nixos_modules.rs.
#   nix-instantiate --eval --strict --json nixos/tests/eval.nix --argstr settings '{...}'
{ settings ? "{}" }:
let
  standin = import ./module-standin.nix;
  r = standin.evalModules {
    modules = [ ../modules/host.nix ../modules/agent.nix ];
    settings = builtins.fromJSON settings;
  };
  services = r.produced.systemd.services or { };
in
{
  inherit (r) options;
  services = builtins.mapAttrs (_: s: {
    enable = s.enable or true;
    execStart = s.serviceConfig.ExecStart or [ ];
    execStop = s.serviceConfig.ExecStop or null;
    loadCredential = s.serviceConfig.LoadCredential or [ ];
    readWritePaths = s.serviceConfig.ReadWritePaths or [ ];
    after = s.after or [ ];
    wantedBy = s.wantedBy or [ ];
  }) services;
  tmpfiles = r.produced.systemd.tmpfiles.rules or [ ];
  packages = r.produced.systemd.packages or [ ];
  users = builtins.attrNames (r.produced.users.users or { });
}
