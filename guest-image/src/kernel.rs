//! The guest kernel: built by `kernel/build.sh` from Debian's
//! linux-source-6.12, our config fragment and patches, cached by recipe hash.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Errors finding or building the kernel.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("cannot run {script}: {source}")]
    Spawn {
        script: String,
        source: std::io::Error,
    },
    #[error("the guest kernel build failed (exit {code:?}); see the output above. Needs: apt-get install linux-source-6.12 bc bison flex libelf-dev cpio lz4")]
    Build { code: Option<i32> },
    #[error("the kernel build printed no usable folder: {0:?}")]
    Output(String),
}

/// The built kernel's files.
#[derive(Debug, Clone)]
pub struct GuestKernel {
    /// Folder holding the files.
    pub dir: PathBuf,
    /// Uncompressed ELF.
    pub vmlinux: PathBuf,
    /// Compressed bzImage.
    pub bzimage: PathBuf,
}

impl GuestKernel {
    fn in_dir(dir: PathBuf) -> Self {
        Self {
            vmlinux: dir.join("vmlinux"),
            bzimage: dir.join("bzImage"),
            dir,
        }
    }
}

/// Whether the kernel at `vmlinux` can be booted with part of its
/// memory and given the rest later (memory hotplug with the probe
/// interface, and the firmware's memory map to find the rest), as its
/// `config` beside it says. A kernel without a `config` cannot.
pub fn adds_memory_after_boot(vmlinux: &Path) -> bool {
    let Some(config) = vmlinux
        .parent()
        .and_then(|d| std::fs::read_to_string(d.join("config")).ok())
    else {
        return false;
    };
    ["CONFIG_ARCH_MEMORY_PROBE=y", "CONFIG_FIRMWARE_MEMMAP=y"]
        .iter()
        .all(|want| config.lines().any(|l| l == *want))
}

/// The path of the build script.
pub fn build_script() -> PathBuf {
    crate::recipe_dir().join("kernel").join("build.sh")
}

/// Returns the cached kernel, building it first if needed (minutes; the
/// build's progress goes to this process's stderr). `KEYSTONE_KERNEL_DIR`
/// overrides the recipe with a folder holding `vmlinux` and `bzImage`.
pub fn ensure_kernel() -> Result<GuestKernel, KernelError> {
    if let Some(dir) = std::env::var_os("KEYSTONE_KERNEL_DIR") {
        return Ok(GuestKernel::in_dir(PathBuf::from(dir)));
    }
    let script = build_script();
    let out = Command::new("bash")
        .arg(&script)
        .stderr(Stdio::inherit())
        .output()
        .map_err(|source| KernelError::Spawn {
            script: script.display().to_string(),
            source,
        })?;
    if !out.status.success() {
        return Err(KernelError::Build {
            code: out.status.code(),
        });
    }
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let dir = PathBuf::from(text.lines().last().unwrap_or_default());
    let kernel = GuestKernel::in_dir(dir);
    if kernel.vmlinux.is_file() && kernel.bzimage.is_file() {
        Ok(kernel)
    } else {
        Err(KernelError::Output(text))
    }
}
