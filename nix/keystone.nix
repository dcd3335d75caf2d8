# The `keystone` command: the Rust workspace's cli package, statically
# linked (.cargo/config.toml), with the guest agent embedded and the guest
# kernel named.
#
# - cli/build.rs embeds the static guest agent; KEYSTONE_AGENT_BIN hands it
#   the `guest-agent` package, so the build runs no cargo of its own.
# - guest-image's recipe folder is compiled in as the crate's source
#   folder, which is gone after a Nix build: it is pointed at a copy of the
#   recipes in $out/share/keystone/guest-image instead (the root file
#   system recipe runs from there).
# - KEYSTONE_KERNEL_DIR defaults to the `guest-kernel` package, so the
#   kernel is never built at run time (the recipe's build.sh wants Debian's
#   linux-source package). A user's own KEYSTONE_KERNEL_DIR still wins.
{
  lib,
  rustPlatform,
  glibc,
  makeBinaryWrapper,
  guest-agent,
  guest-kernel,
}:
rustPlatform.buildRustPackage {
  pname = "keystone";
  version = "0.1.0";
  src = import ./source.nix { inherit lib; };
  cargoLock.lockFile = ../Cargo.lock;
  cargoBuildFlags = [
    "-p"
    "keystone"
  ];
  buildInputs = [ glibc.static ];
  nativeBuildInputs = [ makeBinaryWrapper ];

  KEYSTONE_AGENT_BIN = "${guest-agent}/bin/keystone-guest-agent";

  postPatch = ''
    substituteInPlace guest-image/src/lib.rs \
      --replace-fail 'env!("CARGO_MANIFEST_DIR")' "\"$out/share/keystone/guest-image\""
  '';

  # Most of the test suite boots guests (it needs /dev/kvm, a root file
  # system and the network); ./scripts/test.sh runs it on a host.
  doCheck = false;

  postInstall = ''
    mkdir -p $out/share/keystone/guest-image
    cp -r guest-image/kernel guest-image/rootfs $out/share/keystone/guest-image/
    wrapProgram $out/bin/keystone --set-default KEYSTONE_KERNEL_DIR ${guest-kernel}
  '';

  passthru = {
    inherit guest-agent guest-kernel;
  };

  meta = {
    description = "Run AI coding agents inside micro-VMs (keystone agent ...)";
    license = with lib.licenses; [
      asl20
      mit
    ];
    platforms = [ "x86_64-linux" ];
    mainProgram = "keystone";
  };
}
