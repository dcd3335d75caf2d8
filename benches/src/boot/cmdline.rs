//! The kernel command line every VMM gets: one base line (`--cmdline`, or
//! by default what `keystone vm run` would build on this host) plus the
//! part that says where the root is. Each VMM then adds its own device
//! entries (QEMU's microvm and Firecracker their `virtio_mmio.device=`
//! lines, ours too); nothing else differs.
//!
//! `keystone vm run` always puts `console=ttyS0 earlyprintk=ttyS0` in front
//! of its `--cmdline` and appends [`COMMON_GUEST_CMDLINE`] (and the host's
//! options unless `--no-host-cmdline`), so what we hand it is the full line
//! minus those words: the guest then sees the same words as every peer.

use vmm::host::{COMMON_GUEST_CMDLINE, PVM_GUEST_CMDLINE};
use vmm::KvmKind;

/// What `keystone vm run` always puts in front of its `--cmdline`.
const KEYSTONE_PREFIX: &str = "console=ttyS0 earlyprintk=ttyS0";

/// Where the guest's root is, as command-line words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RootWords {
    /// The busybox root on virtio-fs tag `root`, `/init` as init.
    VirtioFs,
    /// An initramfs whose `/init` is the init.
    Initramfs,
    /// The guest agent as PID 1 from its initramfs, the root on tag `root`.
    Agent,
}

impl RootWords {
    pub fn words(self) -> &'static str {
        match self {
            RootWords::VirtioFs => "root=root rootfstype=virtiofs rw init=/init",
            RootWords::Initramfs => "rdinit=/init",
            RootWords::Agent => "keystone.root=root",
        }
    }
}

/// The default base line on a host with this kind of KVM: what
/// `keystone vm run` builds there, without root and device entries.
pub fn default_base(kind: KvmKind) -> String {
    let mut line = format!("{KEYSTONE_PREFIX} {COMMON_GUEST_CMDLINE}");
    if kind == KvmKind::Pvm {
        line.push(' ');
        line.push_str(PVM_GUEST_CMDLINE);
    }
    line
}

/// The line every VMM is given for this root (before its device entries).
pub fn full(base: &str, root: RootWords) -> String {
    join(&[base, root.words()])
}

/// What to pass as `keystone vm run --cmdline` (with `--no-host-cmdline`)
/// so that the guest sees the words of `full`: the words keystone adds by
/// itself are taken out once each. For the agent boot keystone adds
/// `keystone.root=root` itself too.
pub fn keystone_arg(full: &str, root: RootWords) -> String {
    let mut added: Vec<&str> = KEYSTONE_PREFIX
        .split_whitespace()
        .chain(COMMON_GUEST_CMDLINE.split_whitespace())
        .collect();
    if root == RootWords::Agent {
        added.extend(RootWords::Agent.words().split_whitespace());
    }
    let mut kept = Vec::new();
    for word in full.split_whitespace() {
        if let Some(i) = added.iter().position(|a| *a == word) {
            added.remove(i);
        } else {
            kept.push(word);
        }
    }
    kept.join(" ")
}

/// The words of a line the kernel printed, without the VMM's own
/// `virtio_mmio.device=` entries, sorted: two VMMs gave the guest the same
/// options when these are equal.
pub fn comparable_words(line: &str) -> Vec<String> {
    let mut words: Vec<String> = line
        .split_whitespace()
        .filter(|w| !w.starts_with("virtio_mmio.device="))
        .map(str::to_string)
        .collect();
    words.sort();
    words
}

fn join(parts: &[&str]) -> String {
    parts
        .iter()
        .flat_map(|p| p.split_whitespace())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `keystone vm run` makes of `--cmdline ARG --no-host-cmdline`
    /// (cli/src/vm_run.rs and vmm's build_cmdline), roots as the bench
    /// passes them.
    fn keystone_effective(arg: &str, root: RootWords) -> String {
        let mut line = format!("{KEYSTONE_PREFIX} {arg}");
        if root == RootWords::Agent {
            line.push_str(" keystone.root=root");
        }
        join(&[&line, COMMON_GUEST_CMDLINE])
    }

    #[test]
    fn keystone_gets_the_same_words_as_the_peers() {
        for kind in [KvmKind::Pvm, KvmKind::Hardware] {
            for root in [RootWords::VirtioFs, RootWords::Initramfs, RootWords::Agent] {
                let line = full(&default_base(kind), root);
                let ours = keystone_effective(&keystone_arg(&line, root), root);
                assert_eq!(
                    comparable_words(&ours),
                    comparable_words(&line),
                    "{kind:?} {root:?}"
                );
            }
        }
    }

    #[test]
    fn a_user_base_is_kept_word_for_word() {
        let line = full("console=ttyS0 quiet reboot=k", RootWords::Initramfs);
        assert_eq!(line, "console=ttyS0 quiet reboot=k rdinit=/init");
        // keystone adds console=ttyS0 and reboot=k itself; its own
        // earlyprintk and the rest of the common words stay extra.
        assert_eq!(
            keystone_arg(&line, RootWords::Initramfs),
            "quiet rdinit=/init"
        );
    }

    #[test]
    fn pvm_options_only_on_pvm() {
        assert!(default_base(KvmKind::Pvm).contains("syscall_via_idt"));
        assert!(!default_base(KvmKind::Hardware).contains("syscall_via_idt"));
        assert!(default_base(KvmKind::Hardware).starts_with("console=ttyS0"));
    }

    #[test]
    fn device_entries_do_not_count() {
        assert_eq!(
            comparable_words("b virtio_mmio.device=4K@0xd0000000:5 a"),
            vec!["a".to_string(), "b".to_string()]
        );
    }
}
