{
  description = "ClawOS: run autonomous AI agents in signed, verified microVMs";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-25.05";

  outputs = { self, nixpkgs }:
    let
      system = "x86_64-linux";
      pkgs = nixpkgs.legacyPackages.${system};
      clawos = pkgs.rustPlatform.buildRustPackage {
        pname = "clawos";
        version = "0.1.0";
        src = self;
        cargoLock.lockFile = ./Cargo.lock;
        # The CLI and the host daemons; the guest's static binaries and the e2e tests
        # are built and run by scripts/setup.sh and scripts/test.sh, not here.
        cargoBuildFlags = map (p: "-p ${p}") [
          "clawos-cli"
          "clawos-identity-manager"
          "clawos-inference-proxy"
          "clawos-skill-manager"
          "clawos-monitor"
          "clawos-vm-launcher"
          "clawos-orchestrator"
          "clawos-control-plane"
        ];
        doCheck = false;
        nativeBuildInputs = with pkgs; [ pkg-config clang rustPlatform.bindgenHook ];
        buildInputs = with pkgs; [ libbpf elfutils zlib libxml2 libxmlsec1 openssl ];
        # The units are the same as on every distribution (packaging/systemd), pointed
        # at this package's binaries; services.clawos (nixos/modules/host.nix) sets
        # their command lines from its options.
        postInstall = ''
          install -Dm0644 -t $out/lib/systemd/system packaging/systemd/*.service packaging/systemd/clawos.target
          substituteInPlace $out/lib/systemd/system/*.service --replace-fail /usr/bin/ $out/bin/
          install -Dm0644 crates/host/clawos.toml $out/share/doc/clawos/clawos.toml
        '';
        meta = {
          description = "Run autonomous AI agents in signed, verified microVMs";
          license = pkgs.lib.licenses.asl20;
          platforms = [ system ];
          mainProgram = "clawos";
        };
      };
    in
    {
      packages.${system}.default = clawos;
      nixosModules = {
        host = { lib, ... }: {
          imports = [ ./nixos/modules/host.nix ];
          services.clawos.package = lib.mkDefault self.packages.${system}.default;
        };
        agent = ./nixos/modules/agent.nix;
        default = { imports = [ self.nixosModules.host self.nixosModules.agent ]; };
      };
    };
}
