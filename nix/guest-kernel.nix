# The Keystone guest kernel: nixpkgs' Linux 6.12 source with the recipe of
# guest-image/kernel/ (read by kernel-recipe.nix): the patches, then
# `make tinyconfig`, the keystone.config fragment merged over it with the
# kernel's merge_config.sh and `make olddefconfig`, every line of the
# fragment checked, as guest-image/kernel/build.sh does. The kernel is then
# built by nixpkgs' linuxManualConfig, whose `config` comes from the parsed
# fragment (no import from derivation).
#
# $out holds bzImage, vmlinux, System.map and config: the folder
# KEYSTONE_KERNEL_DIR names.
{
  lib,
  stdenv,
  linux_6_12,
  linuxManualConfig,
  bc,
  bison,
  flex,
  perl,
}:
let
  recipe = import ./kernel-recipe.nix { inherit lib; };
  inherit (linux_6_12) src version;

  # The .config: the same steps as build.sh, on the same source and patches
  # the kernel build below uses.
  configfile = stdenv.mkDerivation {
    pname = "keystone-guest-kernel-config";
    inherit src version;
    patches = map (p: p.patch) recipe.patches;
    nativeBuildInputs = [
      bc
      bison
      flex
      perl
    ];
    postPatch = ''
      patchShebangs scripts
    '';
    dontConfigure = true;
    buildPhase = ''
      runHook preBuild
      make tinyconfig
      bash scripts/kconfig/merge_config.sh -m -O . .config ${recipe.fragmentFile}
      make olddefconfig
      ${recipe.checkScript}
      runHook postBuild
    '';
    installPhase = ''
      cp .config $out
    '';
  };

  kernel = linuxManualConfig {
    inherit src version configfile;
    # The release is the version plus CONFIG_LOCALVERSION ("-keystone").
    modDirVersion = "${linux_6_12.modDirVersion}${recipe.localVersion}";
    kernelPatches = recipe.patches;
    config = recipe.kconfig;
    allowImportFromDerivation = false;
  };
in
# With CONFIG_MODULES off, manual-config installs only the image and
# System.map; the VMM boots vmlinux, so keep it and the config beside them.
kernel.overrideAttrs (old: {
  pname = "keystone-guest-kernel";
  postInstall = (old.postInstall or "") + ''
    cp vmlinux $out/vmlinux
    cp .config $out/config
  '';
  passthru = (old.passthru or { }) // {
    inherit configfile recipe;
  };
  meta = (old.meta or { }) // {
    description = "Linux ${version} for Keystone guests (tinyconfig + guest-image/kernel/keystone.config)";
    platforms = [ "x86_64-linux" ];
  };
})
