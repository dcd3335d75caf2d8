# `nix develop`: what building and testing Keystone needs (the Debian
# equivalent is scripts/setup.sh). The Rust toolchain, the host tools the
# CLI runs (git, ssh, QEMU for the software-emulation engine), the
# network test's iproute2, a static busybox for minimal guest roots, the
# guest kernel's build dependencies and debootstrap for the root file
# system. guest-image/kernel/build.sh reads nixpkgs' Linux 6.12 tarball
# through KEYSTONE_LINUX_SOURCE.
{
  mkShell,
  cargo,
  rustc,
  clippy,
  rustfmt,
  glibc,
  qemu_kvm,
  git,
  openssh,
  iproute2,
  pkgsStatic,
  runCommand,
  bc,
  bison,
  flex,
  elfutils,
  cpio,
  lz4,
  xz,
  gnumake,
  gcc,
  patch,
  perl,
  file,
  util-linux,
  debootstrap,
  linux_6_12,
}:
let
  # Only the busybox binary: its applet links would shadow coreutils.
  busybox = runCommand "busybox-static-binary" { } ''
    mkdir -p $out/bin
    ln -s ${pkgsStatic.busybox}/bin/busybox $out/bin/busybox
  '';
in
mkShell {
  packages = [
    cargo
    rustc
    clippy
    rustfmt
    glibc.static
    qemu_kvm
    git
    openssh
    iproute2
    busybox
    bc
    bison
    flex
    elfutils
    cpio
    lz4
    xz
    gnumake
    gcc
    patch
    perl
    file
    util-linux
    debootstrap
  ];
  KEYSTONE_LINUX_SOURCE = "${linux_6_12.src}";
}
