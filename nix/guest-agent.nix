# The guest agent (PID 1 of the guest's initramfs), statically linked
# against glibc as guest-image/agent/build-static.sh builds it: the
# repository's .cargo/config.toml adds `+crt-static` for
# x86_64-unknown-linux-gnu, and glibc.static provides the archives.
#
# `keystone` embeds this binary (cli/build.rs takes it from
# KEYSTONE_AGENT_BIN instead of running build-static.sh, which would start
# a second cargo inside the build).
{
  lib,
  rustPlatform,
  glibc,
  file,
}:
rustPlatform.buildRustPackage {
  pname = "keystone-guest-agent";
  version = "0.1.0";
  src = import ./source.nix { inherit lib; };
  cargoLock.lockFile = ../Cargo.lock;
  cargoBuildFlags = [
    "-p"
    "keystone-guest-agent"
  ];
  buildInputs = [ glibc.static ];
  nativeBuildInputs = [ file ];
  # The agent's tests run in a guest (tests/).
  doCheck = false;
  # It runs as PID 1 with no libraries in the guest: refuse a dynamic one.
  postInstall = ''
    case "$(file -L $out/bin/keystone-guest-agent)" in
      *"statically linked"* | *"static-pie linked"*) ;;
      *) echo "keystone-guest-agent is not statically linked" >&2; exit 1 ;;
    esac
  '';
  meta = {
    description = "The Keystone guest agent (static, PID 1 in the guest)";
    license = with lib.licenses; [
      asl20
      mit
    ];
    platforms = [ "x86_64-linux" ];
    mainProgram = "keystone-guest-agent";
  };
}
