//! The vhost-user-vsock backend: queues, features, config space and the
//! event handler, on `vhost-user-backend`'s [`VhostUserBackend`] trait.
//!
//! Queues: rx (0), tx (1), event (2), 256 entries each. All three and the
//! host side run on ONE vring worker thread (`queues_per_thread` = one
//! mask), so the [`Muxer`] is only ever touched from that thread (its mutex
//! is never contended). The host side joins that thread's epoll loop by
//! nesting: the muxer owns an epoll instance holding the Unix listener and
//! every connection's stream, and its fd is registered with the worker via
//! `VringEpollHandler::register_listener` under [`MUXER_EVENT`]. No extra
//! threads.
//!
//! Guest-controlled input never returns an error from `handle_event` (that
//! would stop the worker): bad chains are logged, returned as used with
//! length 0 and, where a header could be decoded, answered with RST.

use std::io;
use std::os::fd::RawFd;
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, RwLock};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use super::muxer::Muxer;
use super::packet::{
    read_tx_packet, rx_capacity, write_rx_packet, VsockHeader, HDR_LEN, MAX_PAYLOAD,
};
use crate::vsock_config_space;
use crate::GuestMemoryMmap;
use log_limit::log_limited;

/// Entries per queue that our VMM's frontend asks for.
pub const QUEUE_SIZE: usize = 256;
/// The largest ring a frontend may set up (QEMU 7.2's
/// vhost-user-vsock-device asks for 1024); the backend works with any
/// size up to this.
pub const MAX_QUEUE_SIZE: usize = 1024;
/// rx, tx and event.
pub const NUM_QUEUES: usize = 3;
pub const RX_QUEUE: u16 = 0;
pub const TX_QUEUE: u16 = 1;
pub const EVENT_QUEUE: u16 = 2;
/// Event id of the muxer's epoll fd (0..=NUM_QUEUES are the library's).
pub const MUXER_EVENT: u16 = NUM_QUEUES as u16 + 1;

/// Most re-checks of a queue after re-enabling notifications, per event.
const MAX_PASSES: usize = 16;

type Mem = GuestMemoryAtomic<GuestMemoryMmap>;

struct Worker {
    muxer: Muxer,
    tx_scratch: Vec<u8>,
    rx_scratch: Vec<u8>,
}

/// A vhost-user-vsock backend for one guest.
pub struct VsockBackend {
    config: Vec<u8>,
    muxer_fd: RawFd,
    event_idx: AtomicBool,
    mem: RwLock<Option<Mem>>,
    worker: Mutex<Worker>,
}

impl VsockBackend {
    /// A backend for the guest at `guest_cid` whose host clients connect to
    /// `listener`.
    pub fn new(guest_cid: u64, listener: UnixListener) -> io::Result<Self> {
        let muxer = Muxer::new(guest_cid, listener)?;
        Ok(Self {
            config: vsock_config_space(guest_cid),
            muxer_fd: muxer.epoll_fd(),
            event_idx: AtomicBool::new(false),
            mem: RwLock::new(None),
            worker: Mutex::new(Worker {
                muxer,
                tx_scratch: Vec::new(),
                rx_scratch: vec![0; MAX_PAYLOAD],
            }),
        })
    }

    /// The fd to register with the vring worker under [`MUXER_EVENT`].
    pub fn muxer_fd(&self) -> RawFd {
        self.muxer_fd
    }

    /// Pops every TX chain and hands its packet to the muxer.
    fn process_tx(&self, vring: &VringRwLock, mem: &GuestMemoryMmap, w: &mut Worker) -> bool {
        let mut used = false;
        loop {
            let chain = vring.get_mut().get_queue_mut().pop_descriptor_chain(mem);
            let Some(chain) = chain else {
                break;
            };
            let head = chain.head_index();
            match read_tx_packet(mem, chain, &mut w.tx_scratch) {
                Ok((hdr, payload)) => w.muxer.handle_guest_packet(&hdr, payload),
                Err(e) => {
                    log_limited!(log::Level::Warn, "vsock: dropping bad TX chain {head}: {e}");
                    if let Ok(hdr) = VsockHeader::decode(&w.tx_scratch) {
                        w.muxer.reject(&hdr);
                    }
                }
            }
            if let Err(e) = vring.add_used(head, 0) {
                log_limited!(
                    log::Level::Warn,
                    "vsock: cannot return TX chain {head}: {e}"
                );
            }
            used = true;
        }
        used
    }

    /// Fills RX chains with packets from the muxer; returns whether any was
    /// used and whether the muxer still had packets when the buffers ran out.
    fn fill_rx(&self, vring: &VringRwLock, mem: &GuestMemoryMmap, w: &mut Worker) -> (bool, bool) {
        let mut used = false;
        while w.muxer.has_rx() {
            let chain = vring.get_mut().get_queue_mut().pop_descriptor_chain(mem);
            let Some(chain) = chain else {
                return (used, true);
            };
            let head = chain.head_index();
            let room = rx_capacity(mem, chain.clone()).unwrap_or(0);
            let mut len = 0;
            if room < HDR_LEN {
                log_limited!(
                    log::Level::Warn,
                    "vsock: RX chain {head} has only {room} writable bytes"
                );
            } else {
                let max = (room - HDR_LEN).min(w.rx_scratch.len());
                let Some((hdr, n)) = w.muxer.pop_rx(&mut w.rx_scratch[..max]) else {
                    vring.get_mut().get_queue_mut().go_to_previous_position();
                    break;
                };
                len = write_rx_packet(mem, chain, &hdr, &w.rx_scratch[..n]).unwrap_or_else(|e| {
                    log_limited!(log::Level::Warn, "vsock: cannot fill RX chain {head}: {e}");
                    0
                });
            }
            if let Err(e) = vring.add_used(head, len) {
                log_limited!(
                    log::Level::Warn,
                    "vsock: cannot return RX chain {head}: {e}"
                );
            }
            used = true;
        }
        (used, false)
    }

    fn process_rx(&self, vring: &VringRwLock, mem: &GuestMemoryMmap, w: &mut Worker) -> bool {
        let mut used = false;
        // Bounded: a guest whose avail index is garbage makes pops fail
        // while enable_notification keeps saying "more", which must not
        // spin this thread forever.
        for _ in 0..MAX_PASSES {
            let (u, starved) = self.fill_rx(vring, mem, w);
            used |= u;
            // Out of buffers with packets waiting: ask for a kick when the
            // driver adds some, and retry if it already has.
            if !starved || !vring.enable_notification().unwrap_or(false) {
                break;
            }
        }
        used
    }
}

fn signal(vring: &VringRwLock, used: bool) {
    if used && vring.needs_notification().unwrap_or(true) {
        if let Err(e) = vring.signal_used_queue() {
            log_limited!(log::Level::Warn, "vsock: cannot signal the guest: {e}");
        }
    }
}

fn queue_ready(vring: &VringRwLock) -> bool {
    let state = vring.get_ref();
    state.is_enabled() && state.get_queue().ready()
}

impl VhostUserBackend for VsockBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let start = (offset as usize).min(self.config.len());
        let end = start.saturating_add(size as usize).min(self.config.len());
        self.config[start..end].to_vec()
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn update_memory(&self, mem: Mem) -> io::Result<()> {
        *self.mem.write().unwrap_or_else(|p| p.into_inner()) = Some(mem);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        vec![(1 << NUM_QUEUES) - 1]
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        _thread: usize,
    ) -> io::Result<()> {
        let mut w = self.worker.lock().unwrap_or_else(|p| p.into_inner());
        if device_event == MUXER_EVENT {
            w.muxer.handle_host_events();
        }
        let atomic = self.mem.read().unwrap_or_else(|p| p.into_inner()).clone();
        let (Some(atomic), [rx, tx, ..]) = (atomic, vrings) else {
            return Ok(());
        };
        let mem = atomic.memory();
        if device_event == TX_QUEUE && queue_ready(tx) {
            let mut used = false;
            if self.event_idx.load(Ordering::Relaxed) {
                for _ in 0..MAX_PASSES {
                    let _ = tx.disable_notification();
                    used |= self.process_tx(tx, &mem, &mut w);
                    if !tx.enable_notification().unwrap_or(false) {
                        break;
                    }
                }
            } else {
                used = self.process_tx(tx, &mem, &mut w);
            }
            signal(tx, used);
        }
        // Whatever happened (a kick on any queue, host traffic, guest
        // packets that queued replies), hand pending packets to the guest.
        if queue_ready(rx) {
            let used = self.process_rx(rx, &mem, &mut w);
            signal(rx, used);
        }
        Ok(())
    }
}
