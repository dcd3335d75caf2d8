# The NixOS module `keystone.agent.*`: installs `keystone` with the host
# tools it runs, lets the listed users open /dev/kvm, turns on nested
# virtualization in the kvm modules, and writes the host's defaults to
# /etc/keystone/agent.toml, the system-wide file `keystone` reads below each
# user's ~/.config/keystone/agent.toml.
#
# Called with the flake's packages (by system) for the package default.
{ packages }:
{
  config,
  lib,
  pkgs,
  ...
}:
let
  inherit (lib)
    literalExpression
    mkEnableOption
    mkIf
    mkOption
    types
    ;
  cfg = config.keystone.agent;
  toml = pkgs.formats.toml { };

  # The keys are the ones cli/src/agent/config/file.rs reads; the bounds are
  # its MEMORY_MIB and VCPUS.
  typedSettings = {
    defaults = {
      memory = cfg.memory;
      vcpus = cfg.vcpus;
      nested_virt = cfg.nested;
      sync_mode = cfg.syncMode;
    };
    backend.microvm.engine = cfg.engine;
    network.allow = cfg.networkAllow;
  };
in
{
  options.keystone.agent = {
    enable = mkEnableOption "Keystone Agent Sandbox: AI coding agents in micro-VMs (`keystone agent`)";

    package = mkOption {
      type = types.package;
      default = packages.${pkgs.stdenv.hostPlatform.system}.keystone;
      defaultText = literalExpression "keystone.packages.\${pkgs.stdenv.hostPlatform.system}.keystone";
      description = "The `keystone` package (its wrapper points KEYSTONE_KERNEL_DIR at the guest kernel).";
    };

    memory = mkOption {
      type = types.ints.between 128 1048576;
      default = 8192;
      description = "Default guest memory of a new sandbox, in MiB (`[defaults] memory`; `--memory` overrides it).";
    };

    vcpus = mkOption {
      type = types.ints.between 1 255;
      default = 4;
      description = "Default number of vCPUs of a new sandbox (`[defaults] vcpus`; `--vcpus` overrides it).";
    };

    nested = mkOption {
      type = types.bool;
      default = true;
      description = ''
        Whether sandboxes get nested virtualization (/dev/kvm inside the
        guest) by default (`[defaults] nested_virt`), and whether the host's
        kvm_intel and kvm_amd modules load with `nested=1`.
      '';
    };

    syncMode = mkOption {
      type = types.enum [
        "manual"
        "auto-commit"
        "auto-idle"
      ];
      default = "manual";
      description = "When a sandbox's commits move to the host by default (`[defaults] sync_mode`).";
    };

    engine = mkOption {
      type = types.enum [
        "auto"
        "vmm"
        "qemu"
      ];
      default = "auto";
      description = ''
        Which engine runs the micro-VMs (`[backend.microvm] engine`): `vmm`
        is Keystone's VMM on KVM, `qemu` QEMU's software emulation, `auto`
        the VMM where KVM is hardware virtualization and QEMU otherwise.
      '';
    };

    networkAllow = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "10.1.0.0/16" ];
      description = ''
        Private address blocks (CIDRs or single addresses) sandboxes may
        reach through the host's egress proxy (`[network] allow`). Public
        addresses are always allowed; the host itself never is.
      '';
    };

    users = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "alice" ];
      description = "Users allowed to run sandboxes: each is added to the `kvm` group, which owns /dev/kvm.";
    };

    settings = mkOption {
      type = toml.type;
      default = { };
      example = literalExpression ''
        {
          defaults.persist = false;
          proxy.domain = "sandbox.test";
        }
      '';
      description = ''
        Further keys of /etc/keystone/agent.toml (see the NixOS section of
        the README), merged over the ones the options above write.
      '';
    };
  };

  config = mkIf cfg.enable {
    environment.systemPackages = [
      cfg.package
      pkgs.git
      pkgs.openssh
      pkgs.qemu_kvm
    ];

    environment.etc."keystone/agent.toml".source = toml.generate "keystone-agent.toml" (
      lib.recursiveUpdate typedSettings cfg.settings
    );

    users.users = lib.genAttrs cfg.users (_: {
      extraGroups = [ "kvm" ];
    });

    boot.extraModprobeConfig = mkIf cfg.nested ''
      options kvm_intel nested=1
      options kvm_amd nested=1
    '';
  };
}
