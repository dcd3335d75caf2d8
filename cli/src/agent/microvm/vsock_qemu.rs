//! The vsock backend for QEMU's `vhost-user-vsock-device`.
//!
//! QEMU 7.2 sizes the vsock rings at 1024 entries, while
//! `vmm`'s [`VsockBackend`] advertises at most 256 (enough for our VMM,
//! which asks for 256), so QEMU's `SET_VRING_NUM 1024` is refused. This
//! wrapper delegates everything to the same backend and only raises the
//! advertised maximum; the backend works with whatever ring size the
//! frontend set. (The lasting fix belongs in `vmm`: a configurable maximum.)

use std::io;
use std::path::Path;
use std::sync::Arc;

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock};
use vm_memory::GuestMemoryAtomic;
use vmm::devices::virtio::vsock::backend::{VsockBackend, MUXER_EVENT};
use vmm::vstate::memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};

/// QEMU's vsock ring size.
const QEMU_QUEUE_SIZE: usize = 1024;

struct QemuSized(Arc<VsockBackend>);

impl VhostUserBackend for QemuSized {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        self.0.num_queues()
    }
    fn max_queue_size(&self) -> usize {
        QEMU_QUEUE_SIZE.max(self.0.max_queue_size())
    }
    fn features(&self) -> u64 {
        self.0.features()
    }
    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        self.0.protocol_features()
    }
    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.0.get_config(offset, size)
    }
    fn set_event_idx(&self, enabled: bool) {
        self.0.set_event_idx(enabled)
    }
    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        self.0.update_memory(mem)
    }
    fn queues_per_thread(&self) -> Vec<u64> {
        self.0.queues_per_thread()
    }
    fn exit_event(&self, thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        self.0.exit_event(thread_index)
    }
    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        thread_id: usize,
    ) -> io::Result<()> {
        self.0.handle_event(device_event, evset, vrings, thread_id)
    }
}

/// Serves one QEMU frontend on `socket_path` (blocking until it goes);
/// host programs connect to `uds_path` (`CONNECT <port>\n`).
pub fn serve(socket_path: &Path, guest_cid: u64, uds_path: &Path) -> Result<(), String> {
    let _ = std::fs::remove_file(uds_path);
    let listener = std::os::unix::net::UnixListener::bind(uds_path)
        .map_err(|e| format!("cannot listen on {}: {e}", uds_path.display()))?;
    let backend = Arc::new(
        VsockBackend::new(guest_cid, listener).map_err(|e| format!("vsock backend: {e}"))?,
    );
    let fd = backend.muxer_fd();
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::default());
    let mut daemon =
        VhostUserDaemon::new("vhost-user-vsock".into(), Arc::new(QemuSized(backend)), mem)
            .map_err(|e| format!("vsock daemon: {e}"))?;
    let handlers = daemon.get_epoll_handlers();
    let worker = handlers
        .first()
        .ok_or_else(|| "vsock daemon: no vring worker thread".to_string())?;
    worker
        .register_listener(fd, EventSet::IN, u64::from(MUXER_EVENT))
        .map_err(|e| format!("vsock daemon: {e}"))?;
    let result = daemon
        .serve(socket_path)
        .map_err(|e| format!("vsock daemon: {e}"));
    drop(daemon);
    let _ = std::fs::remove_file(uds_path);
    result
}
