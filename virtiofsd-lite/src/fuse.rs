//! FUSE wire format: the structures, opcodes and flags of the kernel's
//! `include/uapi/linux/fuse.h` that this daemon speaks (protocol 7.31+).
//!
//! Every struct is `#[repr(C)]`, has no padding holes (explicit padding
//! fields instead) and implements [`ByteValued`], so it can be read from and
//! written to guest buffers as plain bytes. Reading goes through
//! [`read_struct`] (or the descriptor reader), which fails cleanly on short
//! input instead of panicking.

use std::mem::size_of;

use vm_memory::ByteValued;

/// The protocol major version we speak.
pub const KERNEL_VERSION: u32 = 7;
/// The protocol minor version we answer with.
pub const KERNEL_MINOR_VERSION: u32 = 31;
/// The oldest minor version of the guest kernel that we accept.
pub const MIN_KERNEL_MINOR_VERSION: u32 = 27;
/// The node id of the root directory.
pub const ROOT_ID: u64 = 1;

/// Opcodes (`enum fuse_opcode`).
pub mod opcode {
    pub const LOOKUP: u32 = 1;
    pub const FORGET: u32 = 2;
    pub const GETATTR: u32 = 3;
    pub const SETATTR: u32 = 4;
    pub const READLINK: u32 = 5;
    pub const SYMLINK: u32 = 6;
    pub const MKNOD: u32 = 8;
    pub const MKDIR: u32 = 9;
    pub const UNLINK: u32 = 10;
    pub const RMDIR: u32 = 11;
    pub const RENAME: u32 = 12;
    pub const LINK: u32 = 13;
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const WRITE: u32 = 16;
    pub const STATFS: u32 = 17;
    pub const RELEASE: u32 = 18;
    pub const FSYNC: u32 = 20;
    pub const SETXATTR: u32 = 21;
    pub const GETXATTR: u32 = 22;
    pub const LISTXATTR: u32 = 23;
    pub const REMOVEXATTR: u32 = 24;
    pub const FLUSH: u32 = 25;
    pub const INIT: u32 = 26;
    pub const OPENDIR: u32 = 27;
    pub const READDIR: u32 = 28;
    pub const RELEASEDIR: u32 = 29;
    pub const FSYNCDIR: u32 = 30;
    pub const GETLK: u32 = 31;
    pub const SETLK: u32 = 32;
    pub const SETLKW: u32 = 33;
    pub const ACCESS: u32 = 34;
    pub const CREATE: u32 = 35;
    pub const INTERRUPT: u32 = 36;
    pub const BMAP: u32 = 37;
    pub const DESTROY: u32 = 38;
    pub const IOCTL: u32 = 39;
    pub const POLL: u32 = 40;
    pub const NOTIFY_REPLY: u32 = 41;
    pub const BATCH_FORGET: u32 = 42;
    pub const FALLOCATE: u32 = 43;
    pub const READDIRPLUS: u32 = 44;
    pub const RENAME2: u32 = 45;
    pub const LSEEK: u32 = 46;
    pub const COPY_FILE_RANGE: u32 = 47;
    pub const SETUPMAPPING: u32 = 48;
    pub const REMOVEMAPPING: u32 = 49;
    pub const SYNCFS: u32 = 50;
    pub const TMPFILE: u32 = 51;
    pub const STATX: u32 = 52;
    /// One past the largest opcode we count.
    pub const MAX: u32 = 64;
}

/// `FUSE_INIT` flags (the low 32 bits of the capability set).
pub mod init_flags {
    pub const ASYNC_READ: u32 = 1 << 0;
    pub const POSIX_LOCKS: u32 = 1 << 1;
    pub const ATOMIC_O_TRUNC: u32 = 1 << 3;
    pub const EXPORT_SUPPORT: u32 = 1 << 4;
    pub const BIG_WRITES: u32 = 1 << 5;
    pub const DONT_MASK: u32 = 1 << 6;
    pub const FLOCK_LOCKS: u32 = 1 << 10;
    pub const AUTO_INVAL_DATA: u32 = 1 << 12;
    pub const DO_READDIRPLUS: u32 = 1 << 13;
    pub const READDIRPLUS_AUTO: u32 = 1 << 14;
    pub const ASYNC_DIO: u32 = 1 << 15;
    pub const WRITEBACK_CACHE: u32 = 1 << 16;
    pub const PARALLEL_DIROPS: u32 = 1 << 18;
    pub const HANDLE_KILLPRIV: u32 = 1 << 19;
    pub const MAX_PAGES: u32 = 1 << 22;
    pub const CACHE_SYMLINKS: u32 = 1 << 23;
    pub const INIT_EXT: u32 = 1 << 30;
}

/// `fuse_setattr_in.valid` bits.
pub mod fattr {
    pub const MODE: u32 = 1 << 0;
    pub const UID: u32 = 1 << 1;
    pub const GID: u32 = 1 << 2;
    pub const SIZE: u32 = 1 << 3;
    pub const ATIME: u32 = 1 << 4;
    pub const MTIME: u32 = 1 << 5;
    pub const FH: u32 = 1 << 6;
    pub const ATIME_NOW: u32 = 1 << 7;
    pub const MTIME_NOW: u32 = 1 << 8;
    pub const LOCKOWNER: u32 = 1 << 9;
    pub const CTIME: u32 = 1 << 10;
    pub const KILL_SUIDGID: u32 = 1 << 11;
}

/// `fuse_open_out.open_flags` bits.
pub mod fopen {
    pub const DIRECT_IO: u32 = 1 << 0;
    pub const KEEP_CACHE: u32 = 1 << 1;
    pub const CACHE_DIR: u32 = 1 << 3;
}

/// `fuse_getattr_in.getattr_flags`: `fh` is valid.
pub const GETATTR_FH: u32 = 1;

macro_rules! wire_structs {
    ($($(#[$m:meta])* pub struct $name:ident { $(pub $f:ident : $t:ty),* $(,)? })*) => {$(
        $(#[$m])*
        #[repr(C)]
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        pub struct $name { $(pub $f: $t),* }
        // SAFETY: the struct is `repr(C)`, made only of integer fields laid out
        // without implicit padding (checked by the size tests below), so every
        // byte pattern is a valid value.
        unsafe impl ByteValued for $name {}
    )*};
}

wire_structs! {
    /// `fuse_in_header`.
    pub struct InHeader { pub len: u32, pub opcode: u32, pub unique: u64, pub nodeid: u64,
        pub uid: u32, pub gid: u32, pub pid: u32, pub total_extlen: u16, pub padding: u16 }
    /// `fuse_out_header`.
    pub struct OutHeader { pub len: u32, pub error: i32, pub unique: u64 }
    /// `fuse_init_in` (the first 16 bytes; newer kernels append flags2 and padding).
    pub struct InitIn { pub major: u32, pub minor: u32, pub max_readahead: u32, pub flags: u32 }
    /// `fuse_init_out`.
    pub struct InitOut { pub major: u32, pub minor: u32, pub max_readahead: u32, pub flags: u32,
        pub max_background: u16, pub congestion_threshold: u16, pub max_write: u32,
        pub time_gran: u32, pub max_pages: u16, pub map_alignment: u16, pub flags2: u32,
        pub max_stack_depth: u32, pub unused: [u32; 6] }
    /// `fuse_attr`.
    pub struct Attr { pub ino: u64, pub size: u64, pub blocks: u64, pub atime: u64,
        pub mtime: u64, pub ctime: u64, pub atimensec: u32, pub mtimensec: u32,
        pub ctimensec: u32, pub mode: u32, pub nlink: u32, pub uid: u32, pub gid: u32,
        pub rdev: u32, pub blksize: u32, pub flags: u32 }
    /// `fuse_entry_out`.
    pub struct EntryOut { pub nodeid: u64, pub generation: u64, pub entry_valid: u64,
        pub attr_valid: u64, pub entry_valid_nsec: u32, pub attr_valid_nsec: u32, pub attr: Attr }
    /// `fuse_attr_out`.
    pub struct AttrOut { pub attr_valid: u64, pub attr_valid_nsec: u32, pub dummy: u32,
        pub attr: Attr }
    /// `fuse_getattr_in`.
    pub struct GetattrIn { pub getattr_flags: u32, pub dummy: u32, pub fh: u64 }
    /// `fuse_setattr_in`.
    pub struct SetattrIn { pub valid: u32, pub padding: u32, pub fh: u64, pub size: u64,
        pub lock_owner: u64, pub atime: u64, pub mtime: u64, pub ctime: u64,
        pub atimensec: u32, pub mtimensec: u32, pub ctimensec: u32, pub mode: u32,
        pub unused4: u32, pub uid: u32, pub gid: u32, pub unused5: u32 }
    /// `fuse_open_in`.
    pub struct OpenIn { pub flags: u32, pub open_flags: u32 }
    /// `fuse_open_out`.
    pub struct OpenOut { pub fh: u64, pub open_flags: u32, pub backing_id: i32 }
    /// `fuse_create_in`.
    pub struct CreateIn { pub flags: u32, pub mode: u32, pub umask: u32, pub open_flags: u32 }
    /// `fuse_read_in` (also READDIR and READDIRPLUS).
    pub struct ReadIn { pub fh: u64, pub offset: u64, pub size: u32, pub read_flags: u32,
        pub lock_owner: u64, pub flags: u32, pub padding: u32 }
    /// `fuse_write_in`.
    pub struct WriteIn { pub fh: u64, pub offset: u64, pub size: u32, pub write_flags: u32,
        pub lock_owner: u64, pub flags: u32, pub padding: u32 }
    /// `fuse_write_out`.
    pub struct WriteOut { pub size: u32, pub padding: u32 }
    /// `fuse_mknod_in`.
    pub struct MknodIn { pub mode: u32, pub rdev: u32, pub umask: u32, pub padding: u32 }
    /// `fuse_mkdir_in`.
    pub struct MkdirIn { pub mode: u32, pub umask: u32 }
    /// `fuse_rename_in`.
    pub struct RenameIn { pub newdir: u64 }
    /// `fuse_rename2_in`.
    pub struct Rename2In { pub newdir: u64, pub flags: u32, pub padding: u32 }
    /// `fuse_link_in`.
    pub struct LinkIn { pub oldnodeid: u64 }
    /// `fuse_release_in` (also RELEASEDIR).
    pub struct ReleaseIn { pub fh: u64, pub flags: u32, pub release_flags: u32,
        pub lock_owner: u64 }
    /// `fuse_flush_in`.
    pub struct FlushIn { pub fh: u64, pub unused: u32, pub padding: u32, pub lock_owner: u64 }
    /// `fuse_fsync_in` (also FSYNCDIR).
    pub struct FsyncIn { pub fh: u64, pub fsync_flags: u32, pub padding: u32 }
    /// `fuse_forget_in`.
    pub struct ForgetIn { pub nlookup: u64 }
    /// `fuse_batch_forget_in`.
    pub struct BatchForgetIn { pub count: u32, pub dummy: u32 }
    /// `fuse_forget_one`.
    pub struct ForgetOne { pub nodeid: u64, pub nlookup: u64 }
    /// `fuse_kstatfs`, the whole of `fuse_statfs_out`.
    pub struct Kstatfs { pub blocks: u64, pub bfree: u64, pub bavail: u64, pub files: u64,
        pub ffree: u64, pub bsize: u32, pub namelen: u32, pub frsize: u32, pub padding: u32,
        pub spare: [u32; 6] }
    /// `fuse_dirent` without the name that follows it.
    pub struct Dirent { pub ino: u64, pub off: u64, pub namelen: u32, pub typ: u32 }
    /// `fuse_access_in`.
    pub struct AccessIn { pub mask: u32, pub padding: u32 }
    /// `fuse_getxattr_in` (also LISTXATTR).
    pub struct GetxattrIn { pub size: u32, pub padding: u32 }
    /// `fuse_getxattr_out`.
    pub struct GetxattrOut { pub size: u32, pub padding: u32 }
    /// `fuse_setxattr_in` without `FUSE_SETXATTR_EXT`.
    pub struct SetxattrIn { pub size: u32, pub flags: u32 }
    /// `fuse_fallocate_in`.
    pub struct FallocateIn { pub fh: u64, pub offset: u64, pub length: u64, pub mode: u32,
        pub padding: u32 }
    /// `fuse_lseek_in`.
    pub struct LseekIn { pub fh: u64, pub offset: u64, pub whence: u32, pub padding: u32 }
    /// `fuse_lseek_out`.
    pub struct LseekOut { pub offset: u64 }
    /// `fuse_copy_file_range_in`.
    pub struct CopyFileRangeIn { pub fh_in: u64, pub off_in: u64, pub nodeid_out: u64,
        pub fh_out: u64, pub off_out: u64, pub len: u64, pub flags: u64 }
}

/// `fuse_statfs_out` is exactly a `fuse_kstatfs`.
pub type StatfsOut = Kstatfs;

/// A `fuse_direntplus` header: an entry followed by a dirent (and the name).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Direntplus {
    pub entry_out: EntryOut,
    pub dirent: Dirent,
}
// SAFETY: `repr(C)` of two `ByteValued` structs whose sizes are multiples of 8,
// so there is no padding between or after them.
unsafe impl ByteValued for Direntplus {}

/// Reads a `T` from the front of `buf`, or `None` when `buf` is too short.
pub fn read_struct<T: ByteValued + Default>(buf: &[u8]) -> Option<T> {
    let bytes = buf.get(..size_of::<T>())?;
    T::from_slice(bytes).copied().or_else(|| {
        // `from_slice` needs alignment; copy into an aligned value otherwise.
        let mut val = T::default();
        val.as_mut_slice().copy_from_slice(bytes);
        Some(val)
    })
}

/// The length of a dirent record carrying a name of `namelen` bytes,
/// rounded up to 8 bytes as the kernel expects.
pub fn dirent_size(namelen: usize) -> usize {
    (size_of::<Dirent>() + namelen + 7) & !7
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_match_the_kernel_abi() {
        assert_eq!(size_of::<InHeader>(), 40);
        assert_eq!(size_of::<OutHeader>(), 16);
        assert_eq!(size_of::<InitOut>(), 64);
        assert_eq!(size_of::<Attr>(), 88);
        assert_eq!(size_of::<EntryOut>(), 128);
        assert_eq!(size_of::<AttrOut>(), 104);
        assert_eq!(size_of::<SetattrIn>(), 88);
        assert_eq!(size_of::<ReadIn>(), 40);
        assert_eq!(size_of::<WriteIn>(), 40);
        assert_eq!(size_of::<ReleaseIn>(), 24);
        assert_eq!(size_of::<FlushIn>(), 24);
        assert_eq!(size_of::<Kstatfs>(), 80);
        assert_eq!(size_of::<Dirent>(), 24);
        assert_eq!(size_of::<Direntplus>(), 152);
        assert_eq!(size_of::<FallocateIn>(), 32);
        assert_eq!(size_of::<LseekIn>(), 24);
        assert_eq!(size_of::<CopyFileRangeIn>(), 56);
        assert_eq!(size_of::<CreateIn>(), 16);
        assert_eq!(size_of::<OpenOut>(), 16);
    }

    #[test]
    fn read_struct_rejects_short_input() {
        assert!(read_struct::<InHeader>(&[0u8; 39]).is_none());
        let h = read_struct::<OutHeader>(&[1u8; 17]).unwrap();
        assert_eq!(h.len, 0x0101_0101);
    }
}
