{
  description = "Keystone Agent Sandbox: AI coding agents in micro-VMs";

  # 25.05: Rust 1.86 (the workspace needs 1.85) and Linux 6.12.
  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-25.05";

  outputs =
    { self, nixpkgs }:
    let
      system = "x86_64-linux";
      pkgs = nixpkgs.legacyPackages.${system};
    in
    {
      packages.${system} = rec {
        guest-kernel = pkgs.callPackage ./nix/guest-kernel.nix { };
        guest-agent = pkgs.callPackage ./nix/guest-agent.nix { };
        keystone = pkgs.callPackage ./nix/keystone.nix { inherit guest-agent guest-kernel; };
        default = keystone;
      };

      devShells.${system}.default = pkgs.callPackage ./nix/dev-shell.nix { };

      nixosModules.default = import ./nix/module.nix { packages = self.packages; };

      formatter.${system} = pkgs.nixfmt-rfc-style;
    };
}
