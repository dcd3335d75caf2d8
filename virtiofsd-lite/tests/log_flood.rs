//! A guest that floods a virtio-fs request queue with descriptor chains
//! the daemon cannot read leaves a bounded number of lines in the host's
//! log: every chain still comes back used, and the daemon says so a few
//! times, with how many lines it left out, instead of once per chain.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use log_limit::BURST;
use vhost_user_backend::{VhostUserBackend, VringMutex, VringT};
use virtiofsd_lite::vhost_user::FsBackend;
use virtiofsd_lite::{FileSystem, Server};
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

/// A file system that answers nothing (every operation is ENOSYS): the
/// chains never get as far as a request.
struct NoFs;

impl FileSystem for NoFs {}

/// Counts the warnings about chains.
struct Counter;

static CHAIN_LINES: AtomicUsize = AtomicUsize::new(0);
static ANY: AtomicUsize = AtomicUsize::new(0);

impl log::Log for Counter {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, record: &log::Record<'_>) {
        if record.level() > log::Level::Warn {
            return;
        }
        ANY.fetch_add(1, Ordering::SeqCst);
        if record.args().to_string().contains("bad descriptor chain") {
            CHAIN_LINES.fetch_add(1, Ordering::SeqCst);
        }
    }
    fn flush(&self) {}
}

static COUNTER: Counter = Counter;

const MEM_SIZE: u64 = 0x10000;
const QSIZE: u16 = 64;
const DESC: u64 = 0x0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const CHAINS: u16 = 5000;

#[test]
fn a_flood_of_unreadable_chains_leaves_a_bounded_number_of_log_lines() {
    log::set_logger(&COUNTER).unwrap();
    log::set_max_level(log::LevelFilter::Trace);
    let mem: GuestMemoryMmap<()> =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
    let atomic = GuestMemoryAtomic::new(mem.clone());
    let backend = FsBackend::new(Arc::new(Server::new(NoFs)), 1);
    backend.update_memory(atomic.clone()).unwrap();
    let vrings: Vec<VringMutex> = (0..2)
        .map(|_| VringMutex::new(atomic.clone(), QSIZE).unwrap())
        .collect();
    let queue = &vrings[1];
    queue.set_queue_size(QSIZE);
    queue.set_queue_info(DESC, AVAIL, USED).unwrap();
    queue.set_queue_ready(true);
    queue.set_enabled(true);

    for i in 0..CHAINS {
        // One buffer that lies past the end of guest memory.
        let mut desc = [0u8; 16];
        desc[0..8].copy_from_slice(&(MEM_SIZE + u64::from(i)).to_le_bytes());
        desc[8..12].copy_from_slice(&64u32.to_le_bytes());
        mem.write_slice(&desc, GuestAddress(DESC)).unwrap();
        let idx = i.wrapping_add(1);
        let slot = AVAIL + 4 + 2 * u64::from(i % QSIZE);
        mem.write_obj(0u16.to_le(), GuestAddress(slot)).unwrap();
        mem.write_obj(idx.to_le(), GuestAddress(AVAIL + 2)).unwrap();
        backend
            .handle_event(1, EventSet::IN, &vrings, 0)
            .expect("a bad chain never stops the worker");
        let used: u16 = mem.read_obj(GuestAddress(USED + 2)).unwrap();
        assert_eq!(u16::from_le(used), idx, "chain {i} came back used");
    }
    let lines = CHAIN_LINES.load(Ordering::SeqCst);
    assert!(
        (1..=BURST as usize).contains(&lines),
        "{lines} lines for {CHAINS} unreadable chains"
    );
    assert!(ANY.load(Ordering::SeqCst) <= 2 * BURST as usize);
}
