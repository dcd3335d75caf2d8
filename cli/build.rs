//! Embeds the guest agent: builds `keystone-guest-agent` as a static binary
//! (guest-image/agent/build-static.sh, into a target dir under OUT_DIR so it
//! never contends with the outer build's) and exposes its path to
//! `include_bytes!` as KEYSTONE_AGENT_BIN. Setting KEYSTONE_AGENT_BIN in the
//! environment uses a prebuilt agent instead.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=KEYSTONE_AGENT_BIN");
    let workspace = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("manifest dir"))
        .parent()
        .expect("workspace root")
        .to_path_buf();
    let agent_dir = workspace.join("guest-image/agent");
    println!("cargo:rerun-if-changed={}", agent_dir.join("src").display());
    println!(
        "cargo:rerun-if-changed={}",
        agent_dir.join("Cargo.toml").display()
    );
    println!(
        "cargo:rerun-if-changed={}",
        agent_dir.join("build-static.sh").display()
    );
    // The agent links the protocol crate: a change there changes it too.
    let protocol_dir = workspace.join("agent-protocol");
    for part in ["src", "Cargo.toml"] {
        println!(
            "cargo:rerun-if-changed={}",
            protocol_dir.join(part).display()
        );
    }

    if let Ok(prebuilt) = std::env::var("KEYSTONE_AGENT_BIN") {
        println!("cargo:rustc-env=KEYSTONE_AGENT_BIN={prebuilt}");
        return;
    }
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let target_dir = out_dir.join("agent-target");
    let output = Command::new("sh")
        .arg(agent_dir.join("build-static.sh"))
        .arg(&target_dir)
        // The outer build's flags are for the host binary, not the agent.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET")
        .output()
        .expect("run guest-image/agent/build-static.sh");
    if !output.status.success() {
        panic!(
            "building the static guest agent failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let path = String::from_utf8_lossy(&output.stdout).trim().to_string();
    println!("cargo:rustc-env=KEYSTONE_AGENT_BIN={path}");
}
