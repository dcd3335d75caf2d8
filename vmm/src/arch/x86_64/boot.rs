//! Direct Linux boot: load a vmlinux ELF or a bzImage with linux-loader, the
//! command line and an initrd, and fill `boot_params` (the zero page) with
//! the e820 map, for the 64-bit boot protocol.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::{load_cmdline, BzImage, Cmdline, Elf, KernelLoader};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::kernel_image::KernelImage;
use super::layout::*;

const E820_RAM: u32 = 1;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;
/// loadflags: the kernel is loaded high (protected-mode code at 1 MiB).
const LOADED_HIGH: u8 = 0x01;
/// Offset of the 64-bit entry point in a bzImage's protected-mode code.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;

/// Errors loading a kernel.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BootError {
    /// The kernel image cannot be opened.
    #[error("cannot open kernel image {path}: {source}")]
    OpenKernel {
        /// Its path.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// The file is no kernel image this VMM boots.
    #[error("{path} is neither a vmlinux ELF nor a bzImage (no ELF magic, no 'HdrS' header)")]
    UnknownKernelFormat {
        /// Its path.
        path: String,
    },
    /// The kernel could not be loaded into guest memory.
    #[error("cannot load kernel {path}: {source}")]
    LoadKernel {
        /// Its path.
        path: String,
        /// The loader's error.
        source: linux_loader::loader::Error,
    },
    /// The initrd cannot be opened.
    #[error("cannot open initrd {path}: {source}")]
    OpenInitrd {
        /// Its path.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// The initrd does not fit in guest RAM.
    #[error("initrd of {size} bytes does not fit in guest RAM below {limit:#x}; give the VM more memory")]
    InitrdTooBig {
        /// Its size.
        size: u64,
        /// Where guest RAM for it ends.
        limit: u64,
    },
    /// The initrd could not be copied into guest memory.
    #[error("cannot write the initrd into guest memory: {0}")]
    WriteInitrd(String),
    /// The command line is too long or holds a NUL.
    #[error("kernel command line: {0}")]
    Cmdline(String),
    /// boot_params could not be written.
    #[error("cannot write boot_params: {0}")]
    BootParams(String),
}

/// The kind of kernel image, by its magic numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    /// An uncompressed ELF (vmlinux), entered at its 64-bit entry point.
    Elf,
    /// A bzImage, entered at its 64-bit entry (startup_64).
    BzImage,
}

/// Tells an ELF from a bzImage by their magic numbers.
pub fn detect_kernel_format<R: Read + Seek>(image: &mut R) -> Option<KernelFormat> {
    let mut head = [0u8; 0x206];
    image.seek(SeekFrom::Start(0)).ok()?;
    let n = read_up_to(image, &mut head).ok()?;
    image.seek(SeekFrom::Start(0)).ok()?;
    if n >= 4 && head[..4] == *b"\x7fELF" {
        return Some(KernelFormat::Elf);
    }
    if n >= 0x206 && head[0x202..0x206] == *b"HdrS" {
        return Some(KernelFormat::BzImage);
    }
    None
}

fn read_up_to<R: Read>(r: &mut R, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

/// Where the kernel ended up.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    /// The 64-bit entry point for the boot vCPU.
    pub entry: GuestAddress,
    /// The bzImage setup header, to be copied into boot_params.
    pub setup_header: Option<setup_header>,
    /// First byte after the loaded kernel.
    pub end: u64,
}

/// Loads the kernel at `path` into `mem`.
pub fn load_kernel<M: GuestMemoryBackend>(mem: &M, path: &Path) -> Result<LoadedKernel, BootError> {
    let display = path.display().to_string();
    let mut file = File::open(path).map_err(|source| BootError::OpenKernel {
        path: display.clone(),
        source,
    })?;
    let format = detect_kernel_format(&mut file).ok_or_else(|| BootError::UnknownKernelFormat {
        path: display.clone(),
    })?;
    let mut file = KernelImage::new(file, mem);
    let himem = Some(GuestAddress(HIMEM_START));
    let result = match format {
        KernelFormat::Elf => Elf::load(mem, None, &mut file, himem),
        KernelFormat::BzImage => BzImage::load(mem, None, &mut file, himem),
    }
    .map_err(|source| BootError::LoadKernel {
        path: display,
        source,
    })?;
    let entry = match format {
        KernelFormat::Elf => result.kernel_load,
        KernelFormat::BzImage => result.kernel_load.unchecked_add(BZIMAGE_64BIT_ENTRY_OFFSET),
    };
    Ok(LoadedKernel {
        entry,
        setup_header: result.setup_header,
        end: result.kernel_end,
    })
}

/// Where the initrd was placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitrdPlacement {
    pub addr: u64,
    pub size: u64,
}

/// The end of RAM below the MMIO gap.
pub fn low_ram_end<M: GuestMemoryBackend>(mem: &M) -> u64 {
    mem.iter()
        .map(|r| r.start_addr().raw_value() + r.len())
        .filter(|end| *end <= MMIO_GAP_START)
        .max()
        .unwrap_or(0)
}

/// Copies the initrd at `path` to the top of low RAM, page aligned.
pub fn load_initrd<M: GuestMemoryBackend>(
    mem: &M,
    path: &Path,
    kernel_end: u64,
) -> Result<InitrdPlacement, BootError> {
    let display = path.display().to_string();
    let mut file = File::open(path).map_err(|source| BootError::OpenInitrd {
        path: display.clone(),
        source,
    })?;
    let size = file
        .metadata()
        .map_err(|source| BootError::OpenInitrd {
            path: display,
            source,
        })?
        .len();
    let limit = low_ram_end(mem);
    let addr = limit
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|a| *a >= kernel_end.max(HIMEM_START))
        .ok_or(BootError::InitrdTooBig { size, limit })?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|e| BootError::WriteInitrd(e.to_string()))?;
    Ok(InitrdPlacement { addr, size })
}

/// Writes the command line at [`CMDLINE_START`].
pub fn write_cmdline<M: GuestMemoryBackend>(mem: &M, cmdline: &str) -> Result<(), BootError> {
    let mut c = Cmdline::new(CMDLINE_MAX_SIZE).map_err(|e| BootError::Cmdline(e.to_string()))?;
    c.insert_str(cmdline)
        .map_err(|e| BootError::Cmdline(format!("{e} (at most {} bytes)", CMDLINE_MAX_SIZE - 1)))?;
    load_cmdline(mem, GuestAddress(CMDLINE_START), &c)
        .map_err(|e| BootError::Cmdline(e.to_string()))
}

/// The e820 map for `mem`: low RAM below the EBDA, RAM from 1 MiB to the
/// MMIO gap, and RAM above 4 GiB.
pub fn e820_map<M: GuestMemoryBackend>(mem: &M) -> Vec<boot_e820_entry> {
    let ram = |addr: u64, end: u64| boot_e820_entry {
        addr,
        size: end - addr,
        r#type: E820_RAM,
    };
    let mut map = vec![ram(0, EBDA_START)];
    let low_end = low_ram_end(mem);
    if low_end > HIMEM_START {
        map.push(ram(HIMEM_START, low_end));
    }
    for region in mem.iter() {
        let start = region.start_addr().raw_value();
        if start >= MMIO_GAP_END {
            map.push(ram(start, start + region.len()));
        }
    }
    map
}

/// Builds `boot_params` for the kernel and writes it at [`ZERO_PAGE_START`].
pub fn write_boot_params<M: GuestMemoryBackend>(
    mem: &M,
    kernel: &LoadedKernel,
    cmdline_len: usize,
    initrd: Option<InitrdPlacement>,
) -> Result<boot_params, BootError> {
    let mut params = boot_params::default();
    if let Some(hdr) = kernel.setup_header {
        params.hdr = hdr;
    } else {
        params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
        params.hdr.header = KERNEL_HDR_MAGIC;
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.loadflags |= LOADED_HIGH;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if let Some(initrd) = initrd {
        params.hdr.ramdisk_image = initrd.addr as u32;
        params.hdr.ramdisk_size = initrd.size as u32;
    }
    let map = e820_map(mem);
    for (slot, entry) in params.e820_table.iter_mut().zip(map.iter()) {
        *slot = *entry;
    }
    params.e820_entries = map.len().min(params.e820_table.len()) as u8;

    LinuxBootConfigurator::write_bootparams::<M>(
        &BootParams::new::<boot_params>(&params, GuestAddress(ZERO_PAGE_START)),
        mem,
    )
    .map_err(|e| BootError::BootParams(e.to_string()))?;
    Ok(params)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Cursor, Write};
    use vm_memory::{Bytes, GuestMemoryMmap};

    fn mem(size: u64) -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&crate::arch::x86_64::layout::ram_ranges(size)).unwrap()
    }

    #[test]
    fn detects_formats_by_magic() {
        let mut elf = Cursor::new(b"\x7fELF\x02\x01\x01".to_vec());
        assert_eq!(detect_kernel_format(&mut elf), Some(KernelFormat::Elf));
        let mut bz = vec![0u8; 0x300];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        assert_eq!(
            detect_kernel_format(&mut Cursor::new(bz)),
            Some(KernelFormat::BzImage)
        );
        assert_eq!(detect_kernel_format(&mut Cursor::new(vec![0u8; 16])), None);
        assert_eq!(detect_kernel_format(&mut Cursor::new(Vec::new())), None);
    }

    #[test]
    fn e820_covers_ram_around_the_gap() {
        let small = mem(128 << 20);
        let map = e820_map(&small);
        assert_eq!(map.len(), 2);
        assert_eq!(({ map[0].addr }, { map[0].size }), (0, EBDA_START));
        assert_eq!(
            ({ map[1].addr }, { map[1].addr } + { map[1].size }),
            (HIMEM_START, 128 << 20)
        );

        let big = mem(4 << 30);
        let map = e820_map(&big);
        assert_eq!(map.len(), 3);
        assert_eq!({ map[1].addr } + { map[1].size }, MMIO_GAP_START);
        assert_eq!({ map[2].addr }, MMIO_GAP_END);
        assert_eq!({ map[2].size }, (4 << 30) - MMIO_GAP_START);
        assert!(map.iter().all(|e| { e.r#type } == E820_RAM));
    }

    #[test]
    fn boot_params_for_an_elf_kernel() {
        let m = mem(128 << 20);
        let kernel = LoadedKernel {
            entry: GuestAddress(0x100_0000),
            setup_header: None,
            end: 0x200_0000,
        };
        write_cmdline(&m, "console=ttyS0 panic=-1").unwrap();
        let initrd = InitrdPlacement {
            addr: 0x700_0000,
            size: 4096,
        };
        write_boot_params(&m, &kernel, 22, Some(initrd)).unwrap();
        let p: boot_params = m.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!({ p.hdr.boot_flag }, 0xaa55);
        assert_eq!({ p.hdr.header }, KERNEL_HDR_MAGIC);
        assert_eq!({ p.hdr.type_of_loader }, 0xff);
        assert_eq!({ p.hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ p.hdr.ramdisk_image }, 0x700_0000);
        assert_eq!({ p.hdr.ramdisk_size }, 4096);
        assert_eq!(p.e820_entries, 2);
        let mut line = [0u8; 23];
        m.read_slice(&mut line, GuestAddress(CMDLINE_START))
            .unwrap();
        assert_eq!(&line, b"console=ttyS0 panic=-1\0");
    }

    #[test]
    fn overlong_cmdline_is_refused() {
        let m = mem(16 << 20);
        let long = "a".repeat(CMDLINE_MAX_SIZE + 1);
        assert!(matches!(
            write_cmdline(&m, &long),
            Err(BootError::Cmdline(_))
        ));
    }

    #[test]
    fn initrd_goes_to_the_top_of_low_ram() {
        let m = mem(64 << 20);
        let mut f = tempfile();
        f.write_all(&[0x5a; 10_000]).unwrap();
        let path = f.path.clone();
        let placed = load_initrd(&m, &path, 0x200_0000).unwrap();
        assert_eq!(placed.size, 10_000);
        assert_eq!(placed.addr % 4096, 0);
        assert!(placed.addr + placed.size <= 64 << 20);
        assert_eq!(
            m.read_obj::<u8>(GuestAddress(placed.addr + 9_999)).unwrap(),
            0x5a
        );
        // Too big for RAM above the kernel.
        assert!(matches!(
            load_initrd(&m, &path, (64 << 20) - 4096),
            Err(BootError::InitrdTooBig { .. })
        ));
    }

    struct TempFile {
        path: std::path::PathBuf,
        file: File,
    }
    impl Write for TempFile {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.file.write(b)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            self.file.flush()
        }
    }
    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
    fn tempfile() -> TempFile {
        let path = std::env::temp_dir().join(format!(
            "vmm-initrd-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let file = File::create(&path).unwrap();
        TempFile { path, file }
    }
}
