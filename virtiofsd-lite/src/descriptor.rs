//! Reader and writer over the buffers of one virtqueue descriptor chain.
//!
//! A FUSE request arrives as the device-readable part of a chain and its
//! reply goes into the device-writable part. [`Reader`] and [`Writer`] hold
//! the chain's buffers as guest-memory [`VolatileSlice`]s and consume them
//! front to back. Besides byte copies they move file data straight between
//! a file descriptor and guest memory with `preadv`/`pwritev`
//! ([`Writer::write_from_file_at`], [`Reader::read_to_file_at`]), so READ and
//! WRITE payloads are never staged in a host buffer.
//!
//! Unlike virtio-queue's own `Reader`/`Writer`, these expose the zero-copy
//! file paths; they can also be built from plain byte slices for tests.

use std::collections::VecDeque;
use std::io;
use std::os::fd::RawFd;

use virtio_queue::DescriptorChain;
use vm_memory::{ByteValued, GuestMemoryBackend, GuestMemoryMmap, VolatileSlice};

/// The most iovecs passed to one `preadv`/`pwritev` call (`IOV_MAX`).
const MAX_IOVECS: usize = 1024;

/// Why a descriptor chain could not be turned into buffers.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    /// A descriptor points outside guest memory.
    #[error(
        "descriptor at {addr:#x} (len {len}) is outside guest memory: the driver sent a bad chain"
    )]
    BadAddress { addr: u64, len: u32 },
    /// A readable descriptor follows a writable one.
    #[error(
        "readable descriptor after a writable one: the driver violated the virtio ordering rule"
    )]
    BadOrder,
    /// The sum of the descriptor lengths overflows.
    #[error("descriptor chain length overflows")]
    Overflow,
}

#[derive(Clone, Default)]
struct Buffers<'a> {
    bufs: VecDeque<VolatileSlice<'a, ()>>,
    consumed: usize,
}

impl<'a> Buffers<'a> {
    fn available(&self) -> usize {
        self.bufs.iter().map(|b| b.len()).sum()
    }

    /// The leading slices covering at most `count` bytes.
    fn front(&self, count: usize) -> Vec<VolatileSlice<'a, ()>> {
        let mut out = Vec::new();
        let mut left = count;
        for b in &self.bufs {
            if left == 0 || out.len() == MAX_IOVECS {
                break;
            }
            let n = left.min(b.len());
            if let Ok(s) = b.subslice(0, n) {
                out.push(s);
            }
            left -= n;
        }
        out
    }

    fn advance(&mut self, mut count: usize) {
        self.consumed += count;
        while count > 0 {
            let Some(b) = self.bufs.pop_front() else {
                return;
            };
            if count < b.len() {
                if let Ok(rest) = b.offset(count) {
                    self.bufs.push_front(rest);
                }
                return;
            }
            count -= b.len();
        }
    }

    /// Keeps the first `offset` bytes in `self` and returns the rest.
    fn split_at(&mut self, offset: usize) -> io::Result<Buffers<'a>> {
        let mut left = offset;
        let mut keep = VecDeque::new();
        while let Some(b) = self.bufs.pop_front() {
            if left >= b.len() {
                left -= b.len();
                keep.push_back(b);
                continue;
            }
            if left > 0 {
                keep.push_back(b.subslice(0, left).map_err(io::Error::other)?);
                self.bufs
                    .push_front(b.offset(left).map_err(io::Error::other)?);
            } else {
                self.bufs.push_front(b);
            }
            left = 0;
            break;
        }
        if left > 0 {
            self.bufs = keep;
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let rest = std::mem::replace(&mut self.bufs, keep);
        Ok(Buffers {
            bufs: rest,
            consumed: 0,
        })
    }

    fn iovecs(slices: &[VolatileSlice<'a, ()>]) -> Vec<libc::iovec> {
        slices
            .iter()
            .map(|s| libc::iovec {
                iov_base: s.ptr_guard_mut().as_ptr().cast(),
                iov_len: s.len(),
            })
            .collect()
    }
}

/// The device-readable part of a chain: the request.
#[derive(Clone, Default)]
pub struct Reader<'a> {
    buf: Buffers<'a>,
}

/// The device-writable part of a chain: room for the reply.
#[derive(Clone, Default)]
pub struct Writer<'a> {
    buf: Buffers<'a>,
}

/// Splits a descriptor chain into its readable and writable buffers.
pub fn chain_buffers<'a, M>(
    mem: &'a GuestMemoryMmap<()>,
    chain: DescriptorChain<M>,
) -> Result<(Reader<'a>, Writer<'a>), ChainError>
where
    M: std::ops::Deref,
    M::Target: vm_memory::GuestMemory,
{
    let mut reader = Reader::default();
    let mut writer = Writer::default();
    let mut total: usize = 0;
    for desc in chain {
        total = total
            .checked_add(desc.len() as usize)
            .ok_or(ChainError::Overflow)?;
        let bad = || ChainError::BadAddress {
            addr: desc.addr().0,
            len: desc.len(),
        };
        let target = if desc.is_write_only() {
            &mut writer.buf
        } else if writer.buf.bufs.is_empty() {
            &mut reader.buf
        } else {
            return Err(ChainError::BadOrder);
        };
        for slice in mem.get_slices(desc.addr(), desc.len() as usize) {
            target.bufs.push_back(slice.map_err(|_| bad())?);
        }
    }
    Ok((reader, writer))
}

impl<'a> Reader<'a> {
    /// A reader over plain memory slices (tests, fuzzing).
    pub fn from_slices(slices: Vec<VolatileSlice<'a, ()>>) -> Self {
        Reader {
            buf: Buffers {
                bufs: slices.into(),
                consumed: 0,
            },
        }
    }

    /// Bytes left to read.
    pub fn available(&self) -> usize {
        self.buf.available()
    }

    /// Bytes read so far.
    pub fn bytes_read(&self) -> usize {
        self.buf.consumed
    }

    /// Fills `out` completely or fails with `UnexpectedEof` (consuming nothing).
    pub fn read_exact(&mut self, out: &mut [u8]) -> io::Result<()> {
        if self.available() < out.len() {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let mut off = 0;
        for s in self.buf.front(out.len()) {
            let n = s.copy_to(&mut out[off..off + s.len()]);
            off += n;
        }
        self.buf.advance(out.len());
        Ok(())
    }

    /// Reads a wire struct.
    pub fn read_obj<T: ByteValued + Default>(&mut self) -> io::Result<T> {
        let mut v = T::default();
        self.read_exact(v.as_mut_slice())?;
        Ok(v)
    }

    /// Reads `len` bytes into a new vector.
    pub fn read_vec(&mut self, len: usize) -> io::Result<Vec<u8>> {
        if self.available() < len {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let mut v = vec![0u8; len];
        self.read_exact(&mut v)?;
        Ok(v)
    }

    /// Drops everything after the first `len` bytes.
    pub fn truncate(&mut self, len: usize) -> io::Result<()> {
        self.buf.split_at(len).map(|_| ())
    }

    /// Writes up to `count` bytes of the request into `fd` at `offset` with
    /// one `pwritev` straight from guest memory; returns the bytes written.
    pub fn read_to_file_at(&mut self, fd: RawFd, count: usize, offset: u64) -> io::Result<usize> {
        let slices = self.buf.front(count);
        if slices.is_empty() {
            return Ok(0);
        }
        let iov = Buffers::iovecs(&slices);
        // SAFETY: every iovec points into a live guest-memory (or test) slice
        // that outlives this call; pwritev only reads from them.
        let ret = unsafe {
            libc::pwritev(
                fd,
                iov.as_ptr(),
                iov.len() as libc::c_int,
                offset as libc::off_t,
            )
        };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = ret as usize;
        self.buf.advance(n);
        Ok(n)
    }
}

impl<'a> Writer<'a> {
    /// A writer over plain memory slices (tests, fuzzing).
    pub fn from_slices(slices: Vec<VolatileSlice<'a, ()>>) -> Self {
        Writer {
            buf: Buffers {
                bufs: slices.into(),
                consumed: 0,
            },
        }
    }

    /// Room left for the reply.
    pub fn available(&self) -> usize {
        self.buf.available()
    }

    /// Bytes written so far.
    pub fn bytes_written(&self) -> usize {
        self.buf.consumed
    }

    /// Keeps the first `offset` bytes in `self` and returns a writer for the rest.
    pub fn split_at(&mut self, offset: usize) -> io::Result<Writer<'a>> {
        self.buf.split_at(offset).map(|buf| Writer { buf })
    }

    /// Writes all of `data` or fails (writing nothing) when there is no room.
    pub fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        if self.available() < data.len() {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        let mut off = 0;
        for s in self.buf.front(data.len()) {
            s.copy_from(&data[off..off + s.len()]);
            off += s.len();
        }
        self.buf.advance(data.len());
        Ok(())
    }

    /// Writes a wire struct.
    pub fn write_obj<T: ByteValued>(&mut self, v: T) -> io::Result<()> {
        self.write_all(v.as_slice())
    }

    /// Reads up to `count` bytes of `fd` at `offset` straight into the reply
    /// buffers with one `preadv`; returns the bytes read.
    pub fn write_from_file_at(
        &mut self,
        fd: RawFd,
        count: usize,
        offset: u64,
    ) -> io::Result<usize> {
        let slices = self.buf.front(count);
        if slices.is_empty() {
            return Ok(0);
        }
        let iov = Buffers::iovecs(&slices);
        // SAFETY: every iovec points into a live, writable guest-memory (or
        // test) slice that outlives this call; preadv writes within their lengths.
        let ret = unsafe {
            libc::preadv(
                fd,
                iov.as_ptr(),
                iov.len() as libc::c_int,
                offset as libc::off_t,
            )
        };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = ret as usize;
        self.buf.advance(n);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_and_write_across_slices() {
        let mut a = [0u8; 5];
        let mut b = [0u8; 7];
        let mut w = Writer::from_slices(vec![(&mut a[..]).into(), (&mut b[..]).into()]);
        let mut tail = w.split_at(3).unwrap();
        tail.write_all(b"abcdefghi").unwrap();
        assert!(tail.write_all(b"x").is_err());
        w.write_all(b"XYZ").unwrap();
        assert_eq!(&a, b"XYZab");
        assert_eq!(&b, b"cdefghi");
    }

    #[test]
    fn reader_short_read_consumes_nothing() {
        let mut a = *b"hello";
        let mut r = Reader::from_slices(vec![(&mut a[..]).into()]);
        let mut out = [0u8; 6];
        assert!(r.read_exact(&mut out).is_err());
        assert_eq!(r.available(), 5);
        r.truncate(2).unwrap();
        assert_eq!(r.read_vec(2).unwrap(), b"he");
        assert!(r.truncate(1).is_err());
    }
}
