//! The vhost-user-fs backend: queues, features and the request loop, on
//! `vhost-user-backend`'s [`VhostUserBackend`] trait.
//!
//! Queue 0 is the high-priority queue (FORGET, INTERRUPT), queues 1..=N are
//! request queues. One worker thread from `vhost-user-backend`'s epoll loop
//! serves all of them: a FORGET then never waits on a lock that a request
//! holds (or the reverse), and no kick wakes a second thread; the guest
//! sends FORGETs in floods (one per evicted inode, after
//! `drop_caches` or an unlink), which would otherwise fight every LOOKUP
//! for the node table. A kick pops every available chain,
//! splits it into the request ([`Reader`](crate::descriptor::Reader)) and
//! the reply room ([`Writer`](crate::descriptor::Writer)), runs it through
//! the shared [`Server`] and returns it on the used ring; the guest is
//! signalled after each reply it asks to hear about (honouring
//! `VIRTIO_RING_F_EVENT_IDX`), not once per batch, so with several requests
//! in flight the first waiter resumes while the rest are served.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringMutex, VringState, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::descriptor::chain_buffers;
use crate::filesystem::FileSystem;
use crate::server::Server;
use log_limit::log_limited;

/// Size of every queue.
pub const QUEUE_SIZE: usize = 1024;
/// Index of the high-priority queue.
pub const HIPRIO_QUEUE: usize = 0;

type Mem = GuestMemoryAtomic<GuestMemoryMmap<()>>;

/// A vhost-user-fs backend serving one [`Server`].
pub struct FsBackend<F: FileSystem> {
    server: Arc<Server<F>>,
    request_queues: usize,
    event_idx: AtomicBool,
    mem: RwLock<Option<Mem>>,
}

impl<F: FileSystem> FsBackend<F> {
    /// A backend with one high-priority and `request_queues` request queues.
    pub fn new(server: Arc<Server<F>>, request_queues: usize) -> Self {
        FsBackend {
            server,
            request_queues: request_queues.max(1),
            event_idx: AtomicBool::new(false),
            mem: RwLock::new(None),
        }
    }

    /// The server behind this backend.
    pub fn server(&self) -> &Arc<Server<F>> {
        &self.server
    }

    /// Serves every available chain of the locked `vring`, signalling the
    /// guest after each reply it wants to hear about.
    fn process_queue(&self, vring: &mut VringState, mem: &GuestMemoryMmap<()>) -> io::Result<()> {
        while let Some(chain) = vring.get_queue_mut().pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let len = match chain_buffers(mem, chain) {
                Ok((r, w)) => self.server.handle_message(r, w),
                Err(e) => {
                    log_limited!(
                        log::Level::Warn,
                        "dropping bad descriptor chain {head}: {e}"
                    );
                    0
                }
            };
            vring
                .add_used(head, len as u32)
                .map_err(|e| io::Error::other(format!("cannot return chain {head}: {e}")))?;
            // Not once per batch: with several requests in flight (git's
            // parallel lstat threads), the guest resumes the first waiter
            // while the rest are still being served.
            if vring.needs_notification().map_err(queue_err)? {
                vring.signal_used_queue()?;
            }
        }
        Ok(())
    }
}

fn queue_err(e: virtio_queue::Error) -> io::Error {
    io::Error::other(format!("virtqueue error: {e}"))
}

impl<F: FileSystem + 'static> VhostUserBackend for FsBackend<F> {
    type Bitmap = ();
    type Vring = VringMutex;

    fn num_queues(&self) -> usize {
        1 + self.request_queues
    }

    fn max_queue_size(&self) -> usize {
        QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn update_memory(&self, mem: Mem) -> io::Result<()> {
        *self.mem.write().unwrap_or_else(|p| p.into_inner()) = Some(mem);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        // Every queue on one worker (see the module documentation).
        let n = self.num_queues().clamp(1, 64) as u32;
        vec![u64::MAX >> (64 - n)]
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringMutex],
        _thread: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Err(io::Error::other(format!("unexpected event set {evset:?}")));
        }
        let Some(vring) = vrings.get(device_event as usize) else {
            return Err(io::Error::other(format!(
                "event for unknown queue {device_event}"
            )));
        };
        let atomic = self.mem.read().unwrap_or_else(|p| p.into_inner()).clone();
        let Some(atomic) = atomic else {
            return Err(io::Error::other(
                "queue kicked before the memory table was set",
            ));
        };
        let mem = atomic.memory();
        // One lock for the whole batch: only this worker serves the queue.
        let mut vring = vring.get_mut();
        if self.event_idx.load(Ordering::Relaxed) {
            // Re-check after re-enabling notifications, or a request that
            // arrives in between would wait for the next kick.
            loop {
                vring.disable_notification().map_err(queue_err)?;
                self.process_queue(&mut vring, &mem)?;
                if !vring.enable_notification().map_err(queue_err)? {
                    break;
                }
            }
        } else {
            self.process_queue(&mut vring, &mem)?;
        }
        Ok(())
    }
}
