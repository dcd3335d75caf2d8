//! `keystone vm run` on a KVM with hardware semantics, one boot with many
//! checks: the `host` CPU template and none of the kvm_pvm workarounds on
//! the command line, 2 vCPUs, the Debian root on virtio-fs from
//! virtiofsd-lite, the guest agent (PID 1) answering over our vsock
//! backend, SVM or VMX given to the guest (`--nested on`) with a working
//! `/dev/kvm` in it, a clean exit when the agent shuts the guest down, and
//! a timings JSON that names the kernel, command line, size and nesting.
//!
//! Where this host's KVM is hardware it runs here; on a kvm_pvm host it
//! runs inside the rig's L1 guest (`keystone_tests::rig`). Skips (printing
//! `SKIP: <reason>`) when neither can run, or without a guest rootfs.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use keystone_guest_agent::hybrid::hybrid_vsock_connector_keeping_deadline;
use keystone_guest_agent::protocol::{printable, AGENT_VSOCK_PORT};
use keystone_guest_agent::AgentClient;
use keystone_test_kit::{guest_lock, skip, ScratchDir};
use keystone_tests::rig::{where_to_run, Where};

/// The longest any read from the guest agent waits for data: a guest
/// that stops answering fails the test with its console printed, instead
/// of hanging it.
const READ_DEADLINE: Duration = Duration::from_secs(120);

/// Reads a pipe to its end in a thread (the console must never block the
/// VMM's serial port), echoing each line escaped to stderr behind `tag`,
/// so that a run that stops shows how far the guest got.
fn drain(
    pipe: impl std::io::Read + Send + 'static,
    tag: &'static str,
) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(pipe).split(b'\n') {
            let Ok(line) = line else { break };
            let line = printable(&line);
            eprintln!("{tag}| {line}");
            all.push_str(&line);
            all.push('\n');
        }
        all
    })
}

/// The `keystone vm run` process, killed when the test ends early, so a
/// failed check never leaves the VM running (its console is already out).
struct VmRun(Child);

impl Drop for VmRun {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `argv` in the guest; returns (exit code, stdout).
fn exec(client: &AgentClient, argv: &[&str]) -> (i32, String) {
    let out = client
        .exec_output(argv)
        .unwrap_or_else(|e| panic!("exec {argv:?}: {e}"));
    (
        out.status.code_or_signal(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn vm_run_with_the_host_template_on_hardware_kvm() {
    if let Where::Done = where_to_run("vm_run_with_the_host_template_on_hardware_kvm") {
        return;
    }
    let kernel = guest_image::kernel::ensure_kernel().expect("guest kernel");
    let rootfs = match guest_image::rootfs::ensure_rootfs() {
        Ok(r) => r,
        Err(e) => skip!("no guest rootfs: {e}"),
    };
    let _guest = guest_lock();
    let scratch = ScratchDir::new("vm-run-hw");
    let uds = scratch.path().join("vsock.sock");
    let timings = scratch.path().join("timings.json");
    let t0 = Instant::now();
    let mut vm = VmRun(
        Command::new(env!("CARGO_BIN_EXE_keystone"))
            .args(["vm", "run", "--agent", "--vcpus", "2", "--memory", "512"])
            .args([
                "--cpu-template",
                "auto",
                "--nested",
                "on",
                "--timeout",
                "900",
            ])
            .arg("--kernel")
            .arg(&kernel.vmlinux)
            .arg("--root-dir")
            .arg(&rootfs.dir)
            .arg("--vsock-uds")
            .arg(&uds)
            .arg("--timings-json")
            .arg(&timings)
            .env("XDG_CACHE_HOME", scratch.path().join("cache"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("keystone vm run"),
    );
    let console = drain(vm.0.stdout.take().unwrap(), "console");
    let messages = drain(vm.0.stderr.take().unwrap(), "vm run");
    let client = AgentClient::new(hybrid_vsock_connector_keeping_deadline(
        &uds,
        AGENT_VSOCK_PORT,
        READ_DEADLINE,
    ));
    // The agent answers once the guest is up (polled, generously).
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        if let Ok(Some(status)) = vm.0.try_wait() {
            panic!(
                "keystone vm run ended ({status}) before the agent answered:\n{}\n{}",
                messages.join().unwrap(),
                console.join().unwrap()
            );
        }
        if uds.exists() && client.ping().is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "the agent did not answer");
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "guest agent answered {:.2?} after keystone vm run started",
        t0.elapsed()
    );

    let (code, cpus) = exec(&client, &["nproc"]);
    assert_eq!((code, cpus.trim()), (0, "2"), "two vCPUs");
    let (_, cmdline) = exec(&client, &["cat", "/proc/cmdline"]);
    for workaround in [
        "syscall_via_idt",
        "no_int3_selftest",
        "clearcpuid",
        "noxsave",
    ] {
        assert!(
            !cmdline.contains(workaround),
            "no kvm_pvm workaround on hardware KVM: {cmdline}"
        );
    }
    let (_, flags) = exec(
        &client,
        &["sh", "-c", "grep -cw -e svm -e vmx /proc/cpuinfo"],
    );
    assert_eq!(flags.trim(), "2", "VMX/SVM on both vCPUs");
    let (code, kvm) = exec(&client, &["sh", "-c", "test -c /dev/kvm && echo present"]);
    assert_eq!((code, kvm.trim()), (0, "present"), "the guest has /dev/kvm");
    // The Debian root (only the virtio-fs share has it) under the agent's
    // overlay.
    let (_, root) = exec(&client, &["sh", "-c", "cat /etc/debian_version; mount"]);
    assert!(root.starts_with("12."), "the Debian root: {root}");
    assert!(
        root.contains("overlay on / type overlay"),
        "the root is the agent's overlay: {root}"
    );

    client.shutdown(false).expect("shutdown");
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Ok(Some(status)) = vm.0.try_wait() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the VM did not stop after the shutdown"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let stderr = messages.join().unwrap();
    let console = console.join().unwrap();
    assert!(
        status.success(),
        "keystone vm run: {status}\n{stderr}\nconsole:\n{console}"
    );
    assert!(
        stderr.contains("KVM hardware, CPU template host, nested"),
        "{stderr}"
    );

    let doc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&timings).expect("timings JSON")).unwrap();
    eprintln!("timings: {doc}");
    assert_eq!(doc["schema"], 2, "{doc}");
    assert_eq!(doc["kvm"], "hardware", "{doc}");
    assert_eq!(doc["cpu_template"], "host", "{doc}");
    assert_eq!(doc["vcpus"], 2, "{doc}");
    assert_eq!(doc["memory_mib"], 512, "{doc}");
    assert!(doc["nested"]["enabled"].is_string(), "{doc}");
    assert_eq!(
        doc["kernel"]["path"],
        kernel.vmlinux.display().to_string(),
        "{doc}"
    );
    assert_eq!(
        doc["kernel"]["sha256"].as_str().map(str::len),
        Some(64),
        "{doc}"
    );
    assert!(Path::new(doc["kernel"]["path"].as_str().unwrap()).is_file());
    // The boot's exits, by device: the console and the root share at least.
    let exits = doc["exits"].as_array().expect("exits in the timings");
    let count = |kind: &str| {
        exits
            .iter()
            .find(|e| e["kind"] == kind)
            .and_then(|e| e["count"].as_u64())
            .unwrap_or(0)
    };
    assert!(count("io serial") > 0, "{exits:?}");
    assert!(count("mmio virtio-fs root") > 0, "{exits:?}");
}
