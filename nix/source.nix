# The part of the repository the Rust builds read: the workspace (every
# member must be there for cargo to load it), its lock file and
# .cargo/config.toml (static linking for x86_64-unknown-linux-gnu). Docs,
# scripts and nix/ stay out, so editing them rebuilds nothing.
{ lib }:
lib.fileset.toSource {
  root = ../.;
  fileset = lib.fileset.unions [
    ../Cargo.toml
    ../Cargo.lock
    ../.cargo
    ../vmm
    ../virtiofsd-lite
    ../vhost-door
    ../log-limit
    ../vsock-lite
    ../cli
    ../agent-protocol
    ../guest-image
    ../tests
    ../benches
    ../test-kit
  ];
}
