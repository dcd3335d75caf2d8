//! virtio-vsock packets: the 44-byte `struct virtio_vsock_hdr` (virtio 1.2,
//! section 5.10.6), its constants, and moving packets in and out of
//! descriptor chains.
//!
//! Everything here treats guest bytes as hostile: a TX chain whose header is
//! short, whose `len` exceeds the payload that follows or [`MAX_PAYLOAD`],
//! comes back as a [`PacketError`]; nothing panics. Header and payload may be
//! split across descriptors in any way (the virtio-queue `Reader` and
//! `Writer` walk the chain).

use std::io::{Read, Write};

use virtio_queue::{DescriptorChain, Reader, Writer};

use crate::GuestMemoryMmap;

/// Size of `struct virtio_vsock_hdr`.
pub const HDR_LEN: usize = 44;
/// Largest payload one packet may carry (Linux's `VIRTIO_VSOCK_MAX_PKT_BUF_SIZE`).
pub const MAX_PAYLOAD: usize = 64 * 1024;
/// The host's well-known CID.
pub const HOST_CID: u64 = 2;
/// `VIRTIO_VSOCK_TYPE_STREAM`, the only socket type served.
pub const TYPE_STREAM: u16 = 1;

/// `VIRTIO_VSOCK_OP_*`.
pub mod op {
    pub const REQUEST: u16 = 1;
    pub const RESPONSE: u16 = 2;
    pub const RST: u16 = 3;
    pub const SHUTDOWN: u16 = 4;
    pub const RW: u16 = 5;
    pub const CREDIT_UPDATE: u16 = 6;
    pub const CREDIT_REQUEST: u16 = 7;
}

/// `VIRTIO_VSOCK_SHUTDOWN_*` flags of an `OP_SHUTDOWN` packet.
pub mod shutdown {
    /// The sender will receive no more data.
    pub const RCV: u32 = 1;
    /// The sender will send no more data.
    pub const SEND: u32 = 2;
}

/// A decoded `struct virtio_vsock_hdr` (all fields little endian on the wire).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VsockHeader {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

/// Why a TX chain was not a usable packet.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    #[error("the chain holds {0} readable bytes, less than a {HDR_LEN}-byte header")]
    ShortHeader(usize),
    #[error("header announces {len} payload bytes but only {avail} follow")]
    ShortPayload { len: u32, avail: usize },
    #[error("header announces {0} payload bytes, more than the {MAX_PAYLOAD} allowed")]
    PayloadTooLarge(u32),
    #[error("the descriptor chain is not valid guest memory")]
    BadChain,
    #[error("the RX buffer has {0} writable bytes, less than a header")]
    ShortRxBuffer(usize),
    #[error("cannot access guest memory: {0}")]
    Io(String),
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

impl VsockHeader {
    /// Decodes the header at the start of `bytes`.
    pub fn decode(bytes: &[u8]) -> Result<Self, PacketError> {
        if bytes.len() < HDR_LEN {
            return Err(PacketError::ShortHeader(bytes.len()));
        }
        Ok(Self {
            src_cid: le64(bytes, 0),
            dst_cid: le64(bytes, 8),
            src_port: le32(bytes, 16),
            dst_port: le32(bytes, 20),
            len: le32(bytes, 24),
            type_: le16(bytes, 28),
            op: le16(bytes, 30),
            flags: le32(bytes, 32),
            buf_alloc: le32(bytes, 36),
            fwd_cnt: le32(bytes, 40),
        })
    }

    /// Encodes the header in wire format.
    pub fn encode(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// A header answering `self` (ports and CIDs swapped), with `op`.
    pub fn reply(&self, op: u16) -> Self {
        Self {
            src_cid: self.dst_cid,
            dst_cid: self.src_cid,
            src_port: self.dst_port,
            dst_port: self.src_port,
            type_: TYPE_STREAM,
            op,
            ..Self::default()
        }
    }
}

/// Splits `bytes` (everything the guest put in a TX chain, or a prefix of
/// it) into a header and exactly `len` payload bytes.
pub fn parse_packet(bytes: &[u8]) -> Result<(VsockHeader, &[u8]), PacketError> {
    let hdr = VsockHeader::decode(bytes)?;
    if hdr.len as usize > MAX_PAYLOAD {
        return Err(PacketError::PayloadTooLarge(hdr.len));
    }
    let payload = &bytes[HDR_LEN..];
    let payload = payload
        .get(..hdr.len as usize)
        .ok_or(PacketError::ShortPayload {
            len: hdr.len,
            avail: payload.len(),
        })?;
    Ok((hdr, payload))
}

/// Reads the readable part of a TX chain (at most one header and
/// [`MAX_PAYLOAD`] bytes) into `scratch` and parses it.
///
/// On an error `scratch` holds only bytes of this chain (none when the
/// chain is not valid memory), so a header decoded from it to answer the
/// chain is never an earlier packet's.
pub fn read_tx_packet<'s>(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    scratch: &'s mut Vec<u8>,
) -> Result<(VsockHeader, &'s [u8]), PacketError> {
    scratch.clear();
    let mut reader: Reader<'_, ()> = chain.reader(mem).map_err(|_| PacketError::BadChain)?;
    let want = reader.available_bytes().min(HDR_LEN + MAX_PAYLOAD);
    scratch.resize(want, 0);
    reader
        .read_exact(scratch)
        .map_err(|e| PacketError::Io(e.to_string()))?;
    parse_packet(scratch)
}

/// Writes `hdr` (with `len` set to `payload.len()`) and `payload` into the
/// writable part of an RX chain; returns the bytes written.
pub fn write_rx_packet(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    hdr: &VsockHeader,
    payload: &[u8],
) -> Result<u32, PacketError> {
    let mut writer: Writer<'_, ()> = chain.writer(mem).map_err(|_| PacketError::BadChain)?;
    let room = writer.available_bytes();
    if room < HDR_LEN + payload.len() {
        return Err(PacketError::ShortRxBuffer(room));
    }
    let hdr = VsockHeader {
        len: payload.len() as u32,
        ..*hdr
    };
    writer
        .write_all(&hdr.encode())
        .and_then(|()| writer.write_all(payload))
        .map_err(|e| PacketError::Io(e.to_string()))?;
    Ok((HDR_LEN + payload.len()) as u32)
}

/// Writable bytes of an RX chain, or `None` when it is not valid memory.
pub fn rx_capacity(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
) -> Option<usize> {
    let writer: Writer<'_, ()> = chain.writer(mem).ok()?;
    Some(writer.available_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> VsockHeader {
        VsockHeader {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 1234,
            dst_port: 1025,
            len: 5,
            type_: TYPE_STREAM,
            op: op::RW,
            flags: 0,
            buf_alloc: 65536,
            fwd_cnt: 7,
        }
    }

    #[test]
    fn header_round_trips_in_little_endian() {
        let h = sample();
        let b = h.encode();
        assert_eq!(&b[0..8], &3u64.to_le_bytes());
        assert_eq!(&b[30..32], &op::RW.to_le_bytes());
        assert_eq!(VsockHeader::decode(&b).unwrap(), h);
    }

    #[test]
    fn parse_checks_lengths() {
        let mut bytes = sample().encode().to_vec();
        assert_eq!(
            parse_packet(&bytes[..43]),
            Err(PacketError::ShortHeader(43))
        );
        assert_eq!(
            parse_packet(&bytes),
            Err(PacketError::ShortPayload { len: 5, avail: 0 })
        );
        bytes.extend_from_slice(b"helloEXTRA");
        let (h, p) = parse_packet(&bytes).unwrap();
        assert_eq!(h.len, 5);
        assert_eq!(p, b"hello");

        let big = VsockHeader {
            len: (MAX_PAYLOAD + 1) as u32,
            ..sample()
        };
        assert_eq!(
            parse_packet(&big.encode()),
            Err(PacketError::PayloadTooLarge(MAX_PAYLOAD as u32 + 1))
        );
    }

    /// A one-descriptor TX chain whose buffer is (`addr`, `len`).
    fn pop_chain(mem: &GuestMemoryMmap, addr: u64, len: u32) -> DescriptorChain<&GuestMemoryMmap> {
        use virtio_queue::{Queue, QueueOwnedT, QueueT};
        use vm_memory::{Bytes, GuestAddress};
        let (desc, avail, used) = (0x0u64, 0x100u64, 0x200u64);
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        mem.write_slice(&d, GuestAddress(desc)).unwrap();
        mem.write_obj(0u16, GuestAddress(avail + 4)).unwrap();
        mem.write_obj(1u16, GuestAddress(avail + 2)).unwrap();
        let mut q = Queue::new(16).unwrap();
        q.try_set_desc_table_address(GuestAddress(desc)).unwrap();
        q.try_set_avail_ring_address(GuestAddress(avail)).unwrap();
        q.try_set_used_ring_address(GuestAddress(used)).unwrap();
        q.set_ready(true);
        q.iter(mem).unwrap().next().unwrap()
    }

    #[test]
    fn unreadable_chain_leaves_no_earlier_header_to_answer() {
        use vm_memory::{Bytes, GuestAddress};
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let bytes = VsockHeader { len: 0, ..sample() }.encode();
        mem.write_slice(&bytes, GuestAddress(0x1000)).unwrap();
        let mut scratch = Vec::new();
        let chain = pop_chain(&mem, 0x1000, HDR_LEN as u32);
        assert_eq!(
            read_tx_packet(&mem, chain, &mut scratch)
                .unwrap()
                .0
                .src_port,
            1234
        );
        // Next, a chain whose buffer lies outside guest memory: the
        // backend answers a bad chain with the header left in `scratch`,
        // which must not be the previous packet's.
        let chain = pop_chain(&mem, 0x20000, HDR_LEN as u32);
        assert_eq!(
            read_tx_packet(&mem, chain, &mut scratch),
            Err(PacketError::BadChain)
        );
        assert!(VsockHeader::decode(&scratch).is_err(), "{scratch:?}");
    }

    #[test]
    fn reply_swaps_addresses() {
        let r = sample().reply(op::RST);
        assert_eq!((r.src_cid, r.dst_cid), (HOST_CID, 3));
        assert_eq!((r.src_port, r.dst_port), (1025, 1234));
        assert_eq!((r.op, r.len, r.type_), (op::RST, 0, TYPE_STREAM));
    }
}
