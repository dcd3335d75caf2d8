//! `--rig`: the whole benchmark inside the rig's L1 guest, a QEMU TCG guest
//! whose CPU (`-cpu max`) has AMD SVM with nested paging, so that its
//! `/dev/kvm` is kvm_amd with hardware semantics (see `shared/KVM-HERE.md`
//! and `keystone_tests::rig`). L1 sees this host's root read-only and has
//! its own `/tmp`; the inner benchmark writes its JSON there and prints it
//! on L1's console between two markers, where this side picks it up.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use keystone_tests::last_lines;
use keystone_tests::rig::{self, RigSize};

use super::setup::Tools;
use super::{host, BootArgs};

const BEGIN: &str = "KEYSTONE-BENCH-JSON-BEGIN";
const END: &str = "KEYSTONE-BENCH-JSON-END";
/// The most JSON taken from L1's console.
const JSON_CAP: usize = 8 << 20;

/// What the `kvm` field says inside the rig.
pub const RIG_KVM: &str = "kvm_amd in a QEMU TCG guest (-cpu max)";

/// Single-quotes `s` for sh.
pub fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Paths L1 cannot see as they are here: its `/tmp` is its own.
pub fn hidden_in_l1(path: &Path) -> bool {
    path.starts_with("/tmp")
}

/// The script L1 runs: the inner benchmark (`argv`, already with `--out
/// /tmp/...json`) and then its JSON on one console line between markers.
pub fn script(argv: &[String], out: &str) -> String {
    let cmd: Vec<String> = argv.iter().map(|a| sh_quote(a)).collect();
    format!(
        "export PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin HOME=/tmp/home TMPDIR=/tmp XDG_CACHE_HOME=/tmp/cache\n\
         mkdir -p /tmp/home /tmp/cache\n\
         cd /tmp\n\
         {} >/dev/null\n\
         rc=$?\n\
         echo {BEGIN}\n\
         tr -d '\\n' < {out}; echo\n\
         echo {END}\n\
         exit $rc\n",
        cmd.join(" ")
    )
}

/// The inner JSON from L1's console text.
pub fn extract(console: &str) -> Result<Value, String> {
    let (_, after) = console
        .split_once(&format!("{BEGIN}\n"))
        .ok_or("L1's console has no benchmark JSON (the inner run failed early)")?;
    let (text, _) = after
        .split_once(END)
        .ok_or("the benchmark JSON on L1's console has no end marker")?;
    if text.len() > JSON_CAP {
        return Err(format!("the benchmark JSON is over {JSON_CAP} bytes"));
    }
    // L1's heartbeat may land between the JSON's writes: a line of its
    // own, or the end of a JSON line's.
    let one_line: String = text
        .lines()
        .map(|line| {
            line.split_once(rig::RIG_LINE)
                .map_or(line, |(json, _)| json)
        })
        .flat_map(|line| line.chars().filter(|c| *c != '\r'))
        .collect();
    serde_json::from_str(&one_line)
        .map_err(|e| format!("the benchmark JSON from L1 does not parse: {e}"))
}

/// The inner benchmark's arguments for `--rig`, every path resolved here.
pub fn argv(args: &BootArgs, t: &Tools, out: &str) -> anyhow::Result<Vec<String>> {
    let exe = std::env::current_exe()?;
    let mut paths = vec![
        exe.clone(),
        t.keystone.clone(),
        t.virtiofsd.clone(),
        t.qemu.clone(),
        t.kernel.clone(),
    ];
    paths.extend(args.peer.iter().map(|p| p.program.clone()));
    if let Some(i) = args.initrd.as_deref().filter(|i| *i != "busybox") {
        paths.push(PathBuf::from(i));
    }
    if let Some(p) = paths.iter().find(|p| hidden_in_l1(p)) {
        anyhow::bail!(
            "{} is under /tmp, which the rig's L1 guest does not share; put it elsewhere",
            p.display()
        );
    }
    let s = |p: &Path| p.display().to_string();
    let mut a = vec![
        s(&exe),
        "boot".into(),
        "--runs".into(),
        args.runs.to_string(),
        "--vcpus".into(),
        args.vcpus.to_string(),
        "--memory".into(),
        args.memory.to_string(),
        "--timeout".into(),
        args.timeout.to_string(),
        "--keystone".into(),
        s(&t.keystone),
        "--virtiofsd".into(),
        s(&t.virtiofsd),
        "--qemu".into(),
        s(&t.qemu),
        "--qemu-cpu".into(),
        args.qemu_cpu.clone(),
        "--kernel".into(),
        s(&t.kernel),
        "--out".into(),
        out.into(),
    ];
    if let Some(c) = &args.cmdline {
        a.extend(["--cmdline".into(), c.clone()]);
    }
    if let Some(i) = &args.initrd {
        a.extend(["--initrd".into(), i.clone()]);
    }
    for p in &args.peer {
        a.extend(["--peer".into(), format!("{}={}", p.name, s(&p.program))]);
    }
    for (on, flag) in [(args.no_agent, "--no-agent"), (args.tcg, "--tcg")] {
        if on {
            a.push(flag.into());
        }
    }
    Ok(a)
}

/// Boots L1, runs the inner benchmark there and returns its report, marked
/// as measured in the rig.
pub fn run(argv: &[String], out: &str, size: &RigSize) -> anyhow::Result<Value> {
    if let Some(why) = rig::rig_missing() {
        anyhow::bail!("the rig cannot run here: {why}");
    }
    let outer = host::describe();
    let t = Instant::now();
    eprintln!(
        "keystone-benches: booting the rig's L1 guest (QEMU TCG, -cpu max, {} MiB, {} vCPU) ...",
        size.memory_mib, size.vcpus
    );
    let console = rig::run_command_in_l1(&script(argv, out), size);
    let wall = t.elapsed();
    let (console, ok) = match console {
        Ok(c) => (c, true),
        Err(e) => (e, false),
    };
    let mut doc = match extract(&console) {
        Ok(d) => d,
        Err(why) => {
            let tail = last_lines(&console, 40);
            anyhow::bail!("{why}; L1's console ends:\n{tail}");
        }
    };
    doc["host"]["kvm"] = RIG_KVM.into();
    // The host's date heads the document; L1's own (from its emulated
    // RTC at boot) stays beside it.
    let l1_date = doc["date"].take();
    doc["date"] = host::utc_now().into();
    doc["rig"] = json!({
        "what": "the whole benchmark ran inside the rig's L1 guest: QEMU TCG with -cpu max (AMD SVM, nested paging) on this host, kvm_amd built into our guest kernel, this host's root shared read-only over virtio-fs",
        "l1": {
            "qemu": "-M microvm,acpi=off -accel tcg -cpu max",
            "memory_mib": size.memory_mib,
            "vcpus": size.vcpus,
        },
        "outer_host": outer,
        "inner_exit_ok": ok,
        "l1_clock_date": l1_date,
        "wall_s": (wall.as_secs_f64() * 10.0).round() / 10.0,
        "inner_argv": argv,
    });
    Ok(doc)
}

/// L1's size for a benchmark with `vcpus` guest vCPUs.
pub fn size_for(vcpus: u8, runs: u32, boots_per_run: u32, timeout: Duration) -> RigSize {
    // Each boot is a few seconds in L1; allow the per-boot limit for a
    // few of them, and a generous amount for the rest.
    let boots = u64::from(runs) * u64::from(boots_per_run);
    let budget = Duration::from_secs(300 + 60 * boots).max(timeout * 2);
    RigSize {
        memory_mib: 2048,
        vcpus: u32::from(vcpus.max(1)),
        timeout: budget,
        ..RigSize::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_json_comes_back_from_between_the_markers() {
        let console = format!(
            "boot noise\n{BEGIN}\n{{  \"schema\": 2,  \"host\": {{\"kvm_kind\": \"hardware\"}}}}\n{END}\nRIG-EXIT 0\n"
        );
        let doc = extract(&console).unwrap();
        assert_eq!(doc["schema"], 2);
        assert_eq!(doc["host"]["kvm_kind"], "hardware");
        // L1's heartbeat between two writes of the JSON line, and on a
        // line of its own.
        let console = format!(
            "{BEGIN}\n{{\"schema\": 2, RIG-L1-ALIVE uptime=9.1 load=1 1 1\n\"a\": [1,RIG-L1-THREAD 5/5 sh state=S\n 2]}}\nRIG-L1-ALIVE uptime=19.1 load=1 1 1\n{END}\n"
        );
        let doc = extract(&console).unwrap();
        assert_eq!(doc["a"][1], 2, "{doc}");
        assert!(extract("no markers").is_err());
        assert!(extract(&format!("{BEGIN}\n{{not json\n{END}\n")).is_err());
        assert_eq!(last_lines("a\u{1b}[2Jb", 40), "a\\u{1b}[2Jb");
    }

    #[test]
    fn script_runs_the_inner_benchmark_and_prints_its_json() {
        let s = script(
            &[
                "/x/keystone-benches".into(),
                "boot".into(),
                "--cmdline".into(),
                "a b'c".into(),
            ],
            "/tmp/b.json",
        );
        assert!(s.contains("'/x/keystone-benches' 'boot' '--cmdline' 'a b'\\''c' >/dev/null\n"));
        assert!(s.contains(&format!(
            "echo {BEGIN}\ntr -d '\\n' < /tmp/b.json; echo\necho {END}\n"
        )));
        assert!(s.contains("XDG_CACHE_HOME=/tmp/cache"));
        assert!(s.ends_with("exit $rc\n"));
        assert!(hidden_in_l1(Path::new("/tmp/x")) && !hidden_in_l1(Path::new("/var/tmp/x")));
    }

    fn parsed(argv: &[&str]) -> BootArgs {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            boot: BootArgs,
        }
        Cli::parse_from(std::iter::once("boot").chain(argv.iter().copied())).boot
    }

    fn tools(kernel: &str) -> Tools {
        Tools {
            keystone: "/w/release/keystone".into(),
            virtiofsd: "/w/release/virtiofsd-lite".into(),
            qemu: "/usr/bin/qemu-system-x86_64".into(),
            kernel: kernel.into(),
        }
    }

    #[test]
    fn the_inner_run_gets_every_choice_and_resolved_paths() {
        let args = parsed(&[
            "--rig",
            "--runs",
            "6",
            "--vcpus",
            "2",
            "--initrd",
            "busybox",
            "--cmdline",
            "console=ttyS0 quiet",
            "--peer",
            "firecracker=/opt/fc",
            "--no-agent",
        ]);
        let a = argv(&args, &tools("/k/vmlinux"), "/tmp/b.json").unwrap();
        let after = |f: &str| a[a.iter().position(|x| x == f).expect(f) + 1].clone();
        assert_eq!(a[1], "boot");
        assert!(
            !a.contains(&"--rig".to_string()),
            "the inner run must not boot another L1"
        );
        assert_eq!(after("--runs"), "6");
        assert_eq!(after("--vcpus"), "2");
        assert_eq!(after("--initrd"), "busybox");
        assert_eq!(after("--cmdline"), "console=ttyS0 quiet");
        assert_eq!(after("--peer"), "firecracker=/opt/fc");
        assert_eq!(after("--kernel"), "/k/vmlinux");
        assert_eq!(after("--keystone"), "/w/release/keystone");
        assert_eq!(after("--out"), "/tmp/b.json");
        assert!(a.contains(&"--no-agent".to_string()));
    }

    #[test]
    fn paths_under_tmp_are_refused() {
        let args = parsed(&["--rig"]);
        let e = argv(&args, &tools("/tmp/vmlinux"), "/tmp/b.json").unwrap_err();
        assert!(e.to_string().contains("/tmp/vmlinux is under /tmp"), "{e}");
        let args = parsed(&["--rig", "--initrd", "/tmp/i.cpio"]);
        assert!(argv(&args, &tools("/k/vmlinux"), "/tmp/b.json").is_err());
    }
}
