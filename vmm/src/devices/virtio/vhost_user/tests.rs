//! Protocol tests: a recording vhost-user backend serves the other end of a
//! socket pair on a thread, and the tests assert the exact message sequence
//! and values the frontend sends.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserShMemConfig, VhostUserSharedMsg,
    VhostUserSingleMemoryRegion, VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{
    Backend, BackendReqHandler, Error, GpuBackend, Result, VhostUserBackendReqHandlerMut,
    VhostUserProtocolFeatures,
};
use vhost::VhostUserMemoryRegionBase;
use vm_memory::{GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::*;
use crate::devices::bus::BusDevice;
use crate::devices::virtio::transport::mmio::{status, MmioTransport};
use crate::devices::virtio::{device_type, QueueConfig};
use crate::vstate::memory::create_memfd_memory;

const EVENT_IDX: u64 = 1 << VIRTIO_RING_F_EVENT_IDX;
const INDIRECT: u64 = 1 << VIRTIO_RING_F_INDIRECT_DESC;
const ACCESS_PLATFORM: u64 = 1 << 33;

#[derive(Debug, PartialEq, Eq)]
enum Msg {
    SetOwner,
    GetFeatures,
    SetFeatures(u64),
    GetProtocolFeatures,
    SetProtocolFeatures(u64),
    GetQueueNum,
    /// (guest_phys_addr, memory_size, user_addr, mmap_offset) per region.
    SetMemTable(Vec<(u64, u64, u64, u64)>),
    SetVringNum(u32, u32),
    SetVringAddr {
        index: u32,
        desc: u64,
        used: u64,
        avail: u64,
    },
    SetVringBase(u32, u32),
    SetVringCall(u8),
    SetVringKick(u8),
    SetVringEnable(u32, bool),
    GetVringBase(u32),
}

struct RecordingBackend {
    features: u64,
    protocol: VhostUserProtocolFeatures,
    queue_num: u64,
    fail_mem_table: bool,
    log: Vec<Msg>,
    mem_files: Vec<File>,
    kicks: Vec<(u8, File)>,
    calls: Vec<(u8, File)>,
}

impl RecordingBackend {
    fn new(features: u64) -> Self {
        Self {
            features,
            protocol: VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::CONFIG,
            queue_num: 4,
            fail_mem_table: false,
            log: Vec::new(),
            mem_files: Vec::new(),
            kicks: Vec::new(),
            calls: Vec::new(),
        }
    }
}

fn unsupported<T>() -> Result<T> {
    Err(Error::InvalidOperation(
        "not supported by the recording backend",
    ))
}

impl VhostUserBackendReqHandlerMut for RecordingBackend {
    fn set_owner(&mut self) -> Result<()> {
        self.log.push(Msg::SetOwner);
        Ok(())
    }
    fn reset_owner(&mut self) -> Result<()> {
        unsupported()
    }
    fn reset_device(&mut self) -> Result<()> {
        unsupported()
    }
    fn get_features(&mut self) -> Result<u64> {
        self.log.push(Msg::GetFeatures);
        Ok(self.features)
    }
    fn set_features(&mut self, features: u64) -> Result<()> {
        self.log.push(Msg::SetFeatures(features));
        Ok(())
    }
    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        _postcopy_listening: Option<bool>,
    ) -> Result<Option<Vec<VhostUserMemoryRegionBase>>> {
        let regions = ctx
            .iter()
            .map(|r| (r.guest_phys_addr, r.memory_size, r.user_addr, r.mmap_offset))
            .collect();
        self.log.push(Msg::SetMemTable(regions));
        self.mem_files = files;
        if self.fail_mem_table {
            return Err(Error::InvalidParam);
        }
        Ok(None)
    }
    fn set_vring_num(&mut self, index: u32, num: u32) -> Result<()> {
        self.log.push(Msg::SetVringNum(index, num));
        Ok(())
    }
    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        desc: u64,
        used: u64,
        avail: u64,
        _log: u64,
    ) -> Result<()> {
        self.log.push(Msg::SetVringAddr {
            index,
            desc,
            used,
            avail,
        });
        Ok(())
    }
    fn set_vring_base(&mut self, index: u32, base: u32) -> Result<()> {
        self.log.push(Msg::SetVringBase(index, base));
        Ok(())
    }
    fn get_vring_base(&mut self, index: u32) -> Result<VhostUserVringState> {
        self.log.push(Msg::GetVringBase(index));
        Ok(VhostUserVringState::new(index, 0))
    }
    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> Result<()> {
        self.log.push(Msg::SetVringKick(index));
        self.kicks.push((index, fd.ok_or(Error::InvalidParam)?));
        Ok(())
    }
    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> Result<()> {
        self.log.push(Msg::SetVringCall(index));
        self.calls.push((index, fd.ok_or(Error::InvalidParam)?));
        Ok(())
    }
    fn set_vring_err(&mut self, _index: u8, _fd: Option<File>) -> Result<()> {
        unsupported()
    }
    fn get_protocol_features(&mut self) -> Result<VhostUserProtocolFeatures> {
        self.log.push(Msg::GetProtocolFeatures);
        Ok(self.protocol)
    }
    fn set_protocol_features(&mut self, features: u64) -> Result<()> {
        self.log.push(Msg::SetProtocolFeatures(features));
        Ok(())
    }
    fn get_queue_num(&mut self) -> Result<u64> {
        self.log.push(Msg::GetQueueNum);
        Ok(self.queue_num)
    }
    fn set_vring_enable(&mut self, index: u32, enable: bool) -> Result<()> {
        self.log.push(Msg::SetVringEnable(index, enable));
        Ok(())
    }
    fn get_config(&mut self, _: u32, _: u32, _: VhostUserConfigFlags) -> Result<Vec<u8>> {
        unsupported()
    }
    fn set_config(&mut self, _: u32, _: &[u8], _: VhostUserConfigFlags) -> Result<()> {
        unsupported()
    }
    fn set_backend_req_fd(&mut self, _backend: Backend) {}
    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> Result<()> {
        unsupported()
    }
    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> Result<File> {
        unsupported()
    }
    fn get_inflight_fd(&mut self, _: &VhostUserInflight) -> Result<(VhostUserInflight, File)> {
        unsupported()
    }
    fn set_inflight_fd(&mut self, _: &VhostUserInflight, _file: File) -> Result<()> {
        unsupported()
    }
    fn get_max_mem_slots(&mut self) -> Result<u64> {
        unsupported()
    }
    fn add_mem_region(
        &mut self,
        _: &VhostUserSingleMemoryRegion,
        _fd: File,
        _postcopy_listening: Option<bool>,
    ) -> Result<Option<VhostUserMemoryRegionBase>> {
        unsupported()
    }
    fn remove_mem_region(&mut self, _: &VhostUserSingleMemoryRegion) -> Result<()> {
        unsupported()
    }
    fn set_device_state_fd(
        &mut self,
        _: VhostTransferStateDirection,
        _: VhostTransferStatePhase,
        _fd: File,
    ) -> Result<Option<File>> {
        unsupported()
    }
    fn check_device_state(&mut self) -> Result<()> {
        unsupported()
    }
    fn get_shmem_config(&mut self) -> Result<VhostUserShMemConfig> {
        unsupported()
    }
    fn set_log_base(&mut self, _: &VhostUserLog, _file: File) -> Result<()> {
        unsupported()
    }
}

struct Harness {
    backend: Arc<Mutex<RecordingBackend>>,
    thread: Option<JoinHandle<()>>,
}

impl Harness {
    /// Serves `backend` on a thread; returns the frontend's end of the pair.
    fn start(backend: RecordingBackend) -> (UnixStream, Self) {
        let (frontend_end, backend_end) = UnixStream::pair().unwrap();
        let backend = Arc::new(Mutex::new(backend));
        let served = backend.clone();
        let thread = std::thread::spawn(move || {
            let mut handler = BackendReqHandler::from_stream(backend_end, served);
            while handler.handle_request().is_ok() {}
        });
        let harness = Self {
            backend,
            thread: Some(thread),
        };
        (frontend_end, harness)
    }

    /// The messages received so far, emptying the log.
    fn take_log(&self) -> Vec<Msg> {
        std::mem::take(&mut self.backend.lock().unwrap().log)
    }

    /// Waits for the backend thread once the frontend closed its socket.
    fn join(mut self) {
        if let Some(thread) = self.thread.take() {
            thread.join().unwrap();
        }
    }
}

fn full_features() -> u64 {
    VIRTIO_F_VERSION_1 | EVENT_IDX | INDIRECT | PROTOCOL_FEATURES_BIT | ACCESS_PLATFORM | 1
}

fn two_region_memory() -> GuestMemoryMmap {
    create_memfd_memory(&[
        (GuestAddress(0), 0x10_0000),
        (GuestAddress(0x1_0000_0000), 0x20_0000),
    ])
    .unwrap()
}

fn hva(mem: &GuestMemoryMmap, addr: u64) -> u64 {
    mem.get_host_address(GuestAddress(addr)).unwrap() as u64
}

fn queue(index: u16, size: u16, base: u64) -> QueueConfig {
    QueueConfig {
        index,
        size,
        desc_table: base,
        avail_ring: base + 0x1000,
        used_ring: base + 0x2000,
    }
}

fn context(
    mem: &GuestMemoryMmap,
    acked: u64,
    queues: Vec<QueueConfig>,
) -> (ActivateContext, Vec<EventFd>, EventFd) {
    let kicks: Vec<EventFd> = queues
        .iter()
        .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
        .collect();
    let call = EventFd::new(EFD_NONBLOCK).unwrap();
    let ctx = ActivateContext {
        mem: mem.clone(),
        acked_features: acked,
        queues,
        kicks: kicks.iter().map(|k| k.try_clone().unwrap()).collect(),
        call: call.try_clone().unwrap(),
    };
    (ctx, kicks, call)
}

#[test]
fn handshake_takes_only_the_protocol_features_it_needs() {
    let (stream, harness) = Harness::start(RecordingBackend::new(full_features()));
    let device = VhostUserDevice::fs(stream, "workspace", 1, 256).unwrap();

    let mq_ack = (VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK).bits();
    assert_eq!(
        harness.take_log(),
        vec![
            Msg::SetOwner,
            Msg::GetFeatures,
            Msg::GetProtocolFeatures,
            Msg::SetProtocolFeatures(mq_ack),
            Msg::GetQueueNum,
        ]
    );
    assert_eq!(device.device_type(), device_type::FS);
    assert_eq!(device.queue_max_sizes(), &[256, 256]);
    // Masked to the allow-list: no PROTOCOL_FEATURES, ACCESS_PLATFORM or bit 0.
    assert_eq!(
        device.avail_features(),
        VIRTIO_F_VERSION_1 | EVENT_IDX | INDIRECT
    );
    let mut config = [0xffu8; 44];
    device.read_config(0, &mut config);
    assert_eq!(&config[..9], b"workspace");
    assert_eq!(&config[36..40], &[1, 0, 0, 0]);
    assert_eq!(
        &config[40..],
        &[0; 4],
        "bytes past the config space read as 0"
    );
    let mut far = [0xffu8; 4];
    device.read_config(u64::MAX, &mut far);
    assert_eq!(far, [0; 4]);

    drop(device);
    harness.join();
}

#[test]
fn extra_features_are_offered_only_if_the_backend_has_them() {
    let (stream, harness) = Harness::start(RecordingBackend::new(full_features()));
    let extra = 1 | (1 << 2) | PROTOCOL_FEATURES_BIT;
    let device = VhostUserDevice::new(
        stream,
        device_type::VSOCK,
        3,
        128,
        vec![3, 0, 0, 0, 0, 0, 0, 0],
        extra,
    )
    .unwrap();
    assert_eq!(
        device.avail_features(),
        VIRTIO_F_VERSION_1 | EVENT_IDX | INDIRECT | 1
    );
    drop(device);
    harness.join();
}

#[test]
fn activation_hands_over_memory_rings_and_eventfds() {
    let (stream, harness) = Harness::start(RecordingBackend::new(full_features()));
    let mut device = VhostUserDevice::fs(stream, "workspace", 1, 256).unwrap();
    harness.take_log();

    let mem = two_region_memory();
    let q0 = queue(0, 64, 0x1000);
    let q1 = queue(1, 256, 0x1_0001_0000);
    let acked = VIRTIO_F_VERSION_1 | EVENT_IDX;
    let (ctx, kicks, call) = context(&mem, acked, vec![q0, q1]);
    device.activate(ctx).unwrap();

    let mut expected = vec![
        Msg::SetFeatures(acked | PROTOCOL_FEATURES_BIT),
        Msg::SetMemTable(vec![
            (0, 0x10_0000, hva(&mem, 0), 0),
            (
                0x1_0000_0000,
                0x20_0000,
                hva(&mem, 0x1_0000_0000),
                0x10_0000,
            ),
        ]),
    ];
    for q in [q0, q1] {
        let i = u32::from(q.index);
        expected.extend([
            Msg::SetVringNum(i, u32::from(q.size)),
            Msg::SetVringAddr {
                index: i,
                desc: hva(&mem, q.desc_table),
                used: hva(&mem, q.used_ring),
                avail: hva(&mem, q.avail_ring),
            },
            Msg::SetVringBase(i, 0),
            Msg::SetVringCall(q.index as u8),
            Msg::SetVringKick(q.index as u8),
            Msg::SetVringEnable(i, true),
        ]);
    }
    assert_eq!(harness.take_log(), expected);

    {
        let mut backend = harness.backend.lock().unwrap();
        // Both regions arrive as the one memfd holding all guest memory.
        assert_eq!(backend.mem_files.len(), 2);
        for file in &backend.mem_files {
            assert_eq!(file.metadata().unwrap().len(), 0x30_0000);
        }
        // The kick the backend got is the guest's kick eventfd...
        kicks[1].write(5).unwrap();
        let (index, kick) = &mut backend.kicks[1];
        assert_eq!(*index, 1);
        let mut value = [0u8; 8];
        kick.read_exact(&mut value).unwrap();
        assert_eq!(u64::from_ne_bytes(value), 5);
        // ...and its call reaches the guest's interrupt eventfd.
        backend.calls[0].1.write_all(&1u64.to_ne_bytes()).unwrap();
    }
    assert_eq!(call.read().unwrap(), 1);

    assert!(device.reset());
    assert_eq!(
        harness.take_log(),
        vec![Msg::GetVringBase(0), Msg::GetVringBase(1)]
    );
    // A second reset has no started queue left to stop.
    assert!(device.reset());
    assert_eq!(harness.take_log(), vec![]);

    drop(device);
    harness.join();
}

#[test]
fn backend_without_protocol_features_gets_no_enable() {
    let (stream, harness) = Harness::start(RecordingBackend::new(VIRTIO_F_VERSION_1 | EVENT_IDX));
    let mut device = VhostUserDevice::fs(stream, "ws", 1, 128).unwrap();
    assert_eq!(harness.take_log(), vec![Msg::SetOwner, Msg::GetFeatures]);
    assert_eq!(device.protocol_features(), None);

    let mem = two_region_memory();
    let (ctx, _kicks, _call) = context(&mem, VIRTIO_F_VERSION_1, vec![queue(1, 16, 0x8000)]);
    device.activate(ctx).unwrap();
    // Without REPLY_ACK the SET_* messages get no answer: GET_VRING_BASE (from
    // the reset) is the round trip that shows they were all processed.
    assert!(device.reset());
    let log = harness.take_log();
    assert_eq!(log[0], Msg::SetFeatures(VIRTIO_F_VERSION_1));
    assert_eq!(
        log[log.len() - 2..],
        [Msg::SetVringKick(1), Msg::GetVringBase(1)]
    );
    assert!(!log.iter().any(|m| matches!(m, Msg::SetVringEnable(..))));

    drop(device);
    harness.join();
}

#[test]
fn backend_without_version_1_is_refused() {
    let (stream, harness) =
        Harness::start(RecordingBackend::new(EVENT_IDX | PROTOCOL_FEATURES_BIT));
    let err = VhostUserDevice::fs(stream, "ws", 1, 128).err().unwrap();
    assert!(matches!(err, VhostUserError::NoVersion1(_)), "{err}");
    harness.join();
}

#[test]
fn backend_with_too_few_queues_is_refused() {
    let mut backend = RecordingBackend::new(full_features());
    backend.queue_num = 2;
    let (stream, harness) = Harness::start(backend);
    let err = VhostUserDevice::fs(stream, "ws", 2, 128).err().unwrap();
    assert!(
        matches!(
            err,
            VhostUserError::TooFewQueues {
                wanted: 3,
                supported: 2
            }
        ),
        "{err}"
    );
    harness.join();
}

#[test]
fn dead_backend_is_a_protocol_error() {
    let (stream, backend_end) = UnixStream::pair().unwrap();
    drop(backend_end);
    let err = VhostUserDevice::fs(stream, "ws", 1, 128).err().unwrap();
    assert!(
        matches!(
            err,
            VhostUserError::Protocol {
                step: "SET_OWNER",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn backend_failure_is_reported_through_reply_ack() {
    let mut backend = RecordingBackend::new(full_features());
    backend.fail_mem_table = true;
    let (stream, harness) = Harness::start(backend);
    let mut device = VhostUserDevice::fs(stream, "ws", 1, 128).unwrap();
    let mem = two_region_memory();
    let (ctx, _kicks, _call) = context(&mem, VIRTIO_F_VERSION_1, vec![queue(0, 16, 0x8000)]);
    let err = device.activate(ctx).unwrap_err();
    assert!(err.to_string().contains("SET_MEM_TABLE"), "{err}");
    drop(device);
    harness.join();
}

#[test]
fn memory_without_a_file_is_refused() {
    let (stream, harness) = Harness::start(RecordingBackend::new(full_features()));
    let mut device = VhostUserDevice::fs(stream, "ws", 1, 128).unwrap();
    harness.take_log();
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    let (ctx, _kicks, _call) = context(&mem, VIRTIO_F_VERSION_1, vec![queue(0, 16, 0x8000)]);
    let err = device.activate(ctx).unwrap_err();
    assert!(err.to_string().contains("not file-backed"), "{err}");
    assert!(!harness
        .take_log()
        .iter()
        .any(|m| matches!(m, Msg::SetMemTable(_))));
    drop(device);
    harness.join();
}

#[test]
fn bad_rings_fail_activation_and_stop_started_queues() {
    let (stream, harness) = Harness::start(RecordingBackend::new(full_features()));
    let mut device = VhostUserDevice::fs(stream, "ws", 1, 256).unwrap();
    let mem = two_region_memory();
    let bad_queues = [
        // Used ring runs past the end of the first region.
        QueueConfig {
            used_ring: 0x10_0000 - 8,
            ..queue(1, 256, 0x8000)
        },
        // Descriptor table misaligned.
        QueueConfig {
            desc_table: 0x8008,
            ..queue(1, 256, 0x8000)
        },
        // Avail ring in the hole between the regions.
        QueueConfig {
            avail_ring: 0x8000_0000,
            ..queue(1, 256, 0x8000)
        },
        // Size not a power of two, and larger than the maximum.
        queue(1, 48, 0x8000),
        queue(1, 512, 0x8000),
        // No such queue.
        queue(2, 16, 0x8000),
    ];
    for bad in bad_queues {
        harness.take_log();
        let (ctx, _kicks, _call) =
            context(&mem, VIRTIO_F_VERSION_1, vec![queue(0, 16, 0x4000), bad]);
        let err = device.activate(ctx).unwrap_err();
        assert!(matches!(err, ActivateError::VhostUser(_)), "{err}");
        let log = harness.take_log();
        // Queue 0 had started; the failed activation stopped it again.
        assert_eq!(log.last(), Some(&Msg::GetVringBase(0)), "{bad:?}: {log:?}");
        assert!(!log.contains(&Msg::SetVringNum(u32::from(bad.index), u32::from(bad.size))));
    }
    let (ctx, _kicks, _call) = context(&mem, VIRTIO_F_VERSION_1, vec![]);
    assert!(matches!(device.activate(ctx), Err(ActivateError::NoQueues)));
    drop(device);
    harness.join();
}

/// The whole path: the guest programs the virtio-mmio registers, DRIVER_OK
/// activates the vhost-user device, and a QueueNotify write reaches the
/// backend's kick file descriptor.
#[test]
fn mmio_transport_drives_a_vhost_user_backend() {
    let (stream, harness) = Harness::start(RecordingBackend::new(full_features()));
    let device = VhostUserDevice::fs(stream, "workspace", 1, 256).unwrap();
    harness.take_log();
    let mem = two_region_memory();
    let mut transport = MmioTransport::new(Box::new(device), mem.clone()).unwrap();
    let w = |t: &mut MmioTransport, offset: u64, value: u32| t.write(offset, &value.to_le_bytes());

    w(&mut transport, 0x70, status::ACKNOWLEDGE);
    w(&mut transport, 0x70, status::ACKNOWLEDGE | status::DRIVER);
    w(&mut transport, 0x24, 1);
    w(&mut transport, 0x20, 1); // VERSION_1 (bit 32)
    let negotiated = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
    w(&mut transport, 0x70, negotiated);
    for (index, base) in [(0u32, 0x4000u64), (1, 0x1_0000_8000)] {
        w(&mut transport, 0x30, index);
        w(&mut transport, 0x38, 128);
        for (reg, addr) in [(0x80, base), (0x90, base + 0x1000), (0xa0, base + 0x2000)] {
            w(&mut transport, reg, addr as u32);
            w(&mut transport, reg + 4, (addr >> 32) as u32);
        }
        w(&mut transport, 0x44, 1);
    }
    w(&mut transport, 0x70, negotiated | status::DRIVER_OK);
    assert!(transport.is_activated());
    assert_eq!(transport.status() & status::DEVICE_NEEDS_RESET, 0);

    let log = harness.take_log();
    assert_eq!(
        log[0],
        Msg::SetFeatures(VIRTIO_F_VERSION_1 | PROTOCOL_FEATURES_BIT)
    );
    assert!(log.contains(&Msg::SetVringAddr {
        index: 1,
        desc: hva(&mem, 0x1_0000_8000),
        used: hva(&mem, 0x1_0000_a000),
        avail: hva(&mem, 0x1_0000_9000),
    }));
    assert_eq!(log.last(), Some(&Msg::SetVringEnable(1, true)));

    w(&mut transport, 0x50, 1);
    {
        let mut backend = harness.backend.lock().unwrap();
        let mut value = [0u8; 8];
        backend.kicks[1].1.read_exact(&mut value).unwrap();
        assert_eq!(u64::from_ne_bytes(value), 1);
    }

    w(&mut transport, 0x70, 0);
    assert_eq!(
        harness.take_log(),
        vec![Msg::GetVringBase(0), Msg::GetVringBase(1)]
    );
    drop(transport);
    harness.join();
}
