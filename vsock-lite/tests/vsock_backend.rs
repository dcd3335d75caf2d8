//! End-to-end test of the vhost-user vsock backend without a VM: the test
//! is the vhost-user frontend (raw `vhost::vhost_user::Frontend` on the
//! stream `spawn_paired` returns), the guest driver (split virtqueues in
//! memfd memory, the test kit's [`DriverQueue`]) and the host program (a
//! Unix stream writing `CONNECT <port>\n`).

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use keystone_test_kit::virtq::{Buf, DriverQueue};
use keystone_test_kit::ScratchDir;
use vhost::vhost_user::message::VhostUserConfigFlags;
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm::device::{create_memfd_memory, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;
use vsock_lite::packet::{op, VsockHeader, HDR_LEN, HOST_CID, TYPE_STREAM};
use vsock_lite::{spawn_paired, VsockConfig};

const CID: u64 = 3;
const QSIZE: u16 = 256;
const VERSION_1: u64 = 1 << 32;
const PROTOCOL_FEATURES: u64 = 1 << 30;
const EVENT_IDX: u64 = 1 << 29;
/// How long the backend may take to use a buffer.
const USE_LIMIT: Duration = Duration::from_secs(5);

fn host_addr(mem: &GuestMemoryMmap, gpa: u64) -> u64 {
    mem.get_host_address(GuestAddress(gpa)).unwrap() as u64
}

struct Guest {
    mem: GuestMemoryMmap,
    rx: DriverQueue,
    tx: DriverQueue,
    _call: EventFd,
    _frontend: Frontend,
    next_tx_buf: u64,
}

const RX_BUFS: u64 = 0x40000;
const RX_BUF_LEN: u32 = 4096;

impl Guest {
    /// Negotiates like a frontend would and starts queues 0 (rx) and 1 (tx).
    fn start(stream: UnixStream) -> Self {
        let mem = create_memfd_memory(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mut fe = Frontend::from_stream(stream, 3);
        fe.set_owner().unwrap();
        let features = fe.get_features().unwrap();
        assert_eq!(
            features & (VERSION_1 | EVENT_IDX | PROTOCOL_FEATURES),
            VERSION_1 | EVENT_IDX | PROTOCOL_FEATURES
        );
        let pf = fe.get_protocol_features().unwrap();
        assert!(pf.contains(VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::CONFIG));
        fe.set_protocol_features(VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::CONFIG)
            .unwrap();
        assert_eq!(fe.get_queue_num().unwrap(), 3);
        let (_, config) = fe
            .get_config(0, 8, VhostUserConfigFlags::WRITABLE, &[0; 8])
            .unwrap();
        assert_eq!(config, CID.to_le_bytes());
        fe.set_features(VERSION_1 | PROTOCOL_FEATURES).unwrap();

        let regions: Vec<VhostUserMemoryRegionInfo> = mem
            .iter()
            .map(|r| {
                let fo = r.file_offset().unwrap();
                VhostUserMemoryRegionInfo {
                    guest_phys_addr: r.start_addr().0,
                    memory_size: r.len(),
                    userspace_addr: host_addr(&mem, r.start_addr().0),
                    mmap_offset: fo.start(),
                    mmap_handle: fo.file().as_raw_fd(),
                }
            })
            .collect();
        fe.set_mem_table(&regions).unwrap();

        let call = EventFd::new(0).unwrap();
        let mut queues = Vec::new();
        for q in 0..2usize {
            let queue = DriverQueue::paged(0x1000 + 0x10000 * q as u64, QSIZE);
            fe.set_vring_num(q, QSIZE).unwrap();
            let addrs = VringConfigData {
                queue_max_size: QSIZE,
                queue_size: QSIZE,
                flags: 0,
                desc_table_addr: host_addr(&mem, queue.desc),
                used_ring_addr: host_addr(&mem, queue.used),
                avail_ring_addr: host_addr(&mem, queue.avail),
                log_addr: None,
            };
            fe.set_vring_addr(q, &addrs).unwrap();
            fe.set_vring_base(q, 0).unwrap();
            fe.set_vring_call(q, &call).unwrap();
            fe.set_vring_kick(q, queue.kick_fd()).unwrap();
            fe.set_vring_enable(q, true).unwrap();
            queues.push(queue);
        }
        let tx = queues.pop().unwrap();
        let mut rx = queues.pop().unwrap();
        for i in 0..32 {
            let buf = Buf::writable(RX_BUFS + u64::from(RX_BUF_LEN) * i, RX_BUF_LEN);
            rx.add_chain(&mem, &[buf]);
            rx.kick();
        }
        Guest {
            mem,
            rx,
            tx,
            _call: call,
            _frontend: fe,
            next_tx_buf: 0x80000,
        }
    }

    /// Next packet the device put on the RX ring.
    fn recv(&mut self) -> (VsockHeader, Vec<u8>) {
        let (head, len) = self.rx.wait_used(&self.mem, USE_LIMIT);
        let addr = RX_BUFS + u64::from(RX_BUF_LEN) * u64::from(head);
        let mut bytes = vec![0u8; len as usize];
        self.mem.read_slice(&mut bytes, GuestAddress(addr)).unwrap();
        let hdr = VsockHeader::decode(&bytes).unwrap();
        assert_eq!(hdr.len as usize, bytes.len() - HDR_LEN);
        (hdr, bytes[HDR_LEN..].to_vec())
    }

    /// Sends a packet with the header and payload in separate descriptors.
    fn send(&mut self, op: u16, src_port: u32, dst_port: u32, payload: &[u8]) {
        let hdr = VsockHeader {
            src_cid: CID,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            len: payload.len() as u32,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 65536,
            fwd_cnt: 0,
        };
        let at = self.next_tx_buf;
        self.next_tx_buf += 0x1000;
        self.mem
            .write_slice(&hdr.encode(), GuestAddress(at))
            .unwrap();
        self.mem
            .write_slice(payload, GuestAddress(at + 0x100))
            .unwrap();
        let mut chain = vec![Buf::readable(at, HDR_LEN as u32)];
        if !payload.is_empty() {
            chain.push(Buf::readable(at + 0x100, payload.len() as u32));
        }
        self.tx.add_chain(&self.mem, &chain);
        self.tx.kick();
        self.tx.wait_used(&self.mem, USE_LIMIT);
    }
}

#[test]
fn vsock_host_connect_reaches_guest_and_bytes_flow_both_ways() {
    let dir = ScratchDir::new("vsock-e2e");
    let uds_path: PathBuf = dir.join("v.sock");
    let config = VsockConfig {
        guest_cid: CID,
        uds_path: uds_path.clone(),
    };
    let (stream, handle) = spawn_paired(config).unwrap();
    let mut guest = Guest::start(stream);

    let mut host = UnixStream::connect(&uds_path).unwrap();
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    host.write_all(b"CONNECT 1234\n").unwrap();
    let (req, _) = guest.recv();
    assert_eq!(
        (req.op, req.src_cid, req.dst_cid, req.dst_port),
        (op::REQUEST, HOST_CID, CID, 1234)
    );
    let host_port = req.src_port;
    assert!(host_port >= 1024);

    guest.send(op::RESPONSE, 1234, host_port, &[]);
    let ok = format!("OK {host_port}\n");
    let mut line = vec![0u8; ok.len()];
    host.read_exact(&mut line).unwrap();
    assert_eq!(line, ok.as_bytes());

    host.write_all(b"ping").unwrap();
    let (h, data) = guest.recv();
    assert_eq!(
        (h.op, h.dst_port, data.as_slice()),
        (op::RW, 1234, &b"ping"[..])
    );

    guest.send(op::RW, 1234, host_port, b"pong");
    let mut got = [0u8; 4];
    host.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"pong");

    // Security invariant 2 through the real protocol: a guest REQUEST to the
    // host is refused.
    guest.send(op::REQUEST, 7000, 22, &[]);
    let (rst, _) = guest.recv();
    assert_eq!((rst.op, rst.src_port, rst.dst_port), (op::RST, 22, 7000));

    // The guest resets the stream: the host sees it closed.
    guest.send(op::RST, 1234, host_port, &[]);
    assert_eq!(host.read(&mut got).unwrap(), 0);

    handle.stop().unwrap();
    assert!(!uds_path.exists());
}

#[test]
fn vsock_frontend_constructor_negotiates_with_spawned_backend() {
    use vmm::device::VhostUserDevice;
    use vmm::device::VirtioDevice;
    use vsock_lite::VsockError;

    let dir = ScratchDir::new("vsock-fe");
    let uds_path = dir.join("v.sock");
    for cid in [0, 1, 2, u64::from(u32::MAX)] {
        let config = VsockConfig {
            guest_cid: cid,
            uds_path: uds_path.clone(),
        };
        assert!(matches!(
            spawn_paired(config),
            Err(VsockError::InvalidCid(_))
        ));
    }
    let config = VsockConfig {
        guest_cid: 42,
        uds_path: uds_path.clone(),
    };
    let (stream, handle) = spawn_paired(config.clone()).unwrap();
    // A second backend on the same host socket is refused, not hijacked.
    assert!(matches!(spawn_paired(config), Err(VsockError::Bind { .. })));
    let device = VhostUserDevice::vsock(stream, 42).unwrap();
    assert_eq!(device.device_type(), 19);
    assert_eq!(device.queue_max_sizes(), &[256, 256, 256]);
    assert_ne!(device.avail_features() & VERSION_1, 0);
    let mut config = [0u8; 8];
    device.read_config(0, &mut config);
    assert_eq!(u64::from_le_bytes(config), 42);
    drop(device);
    // Dropping the handle stops the threads and removes the host socket.
    drop(handle);
    assert!(!uds_path.exists());
}
