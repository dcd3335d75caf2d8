//! The dispatch with a coalesced ring, on the real UART model and a ring
//! page laid out as KVM's (filled the way KVM fills it): queued writes are
//! applied before any later exit, in order, once, by one consumer at a
//! time, and only inside the registered zones.

use std::io::{self, Write};
use std::sync::{Arc, Mutex};

use kvm_ioctls::VcpuExit;
use vmm_sys_util::eventfd::EventFd;

use super::ring::RingPage;
use super::{drain_then_handle, CoalescedIo, Zone};
use crate::devices::bus::Bus;
use crate::devices::legacy::serial::{ConsoleSink, Serial, SERIAL_PORT_COUNT};
use crate::devices::legacy::{BootTimeline, ConsoleLog};
use crate::vstate::exit::ExitAction;

const THR: u16 = 0x3f8;
const LCR: u16 = 0x3fb;
const DLAB: u8 = 0x80;

#[derive(Clone, Default)]
struct Shared(Arc<Mutex<Vec<u8>>>);
impl Write for Shared {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

struct Rig {
    io: Arc<Bus>,
    mmio: Arc<Bus>,
    coalesced: CoalescedIo,
    log: Arc<ConsoleLog>,
    serial: Arc<Mutex<Serial>>,
}

impl Rig {
    fn new() -> Self {
        let log = Arc::new(ConsoleLog::new());
        let sink = ConsoleSink::new(
            Box::new(Shared::default()),
            log.clone(),
            Arc::new(BootTimeline::new()),
        );
        let serial = Arc::new(Mutex::new(Serial::new(
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            sink,
        )));
        let mut io = Bus::new();
        io.insert(serial.clone(), u64::from(THR), SERIAL_PORT_COUNT, "serial")
            .unwrap();
        let (io, mmio) = (Arc::new(io), Arc::new(Bus::new()));
        let ring = RingPage::anonymous().unwrap();
        let zones = vec![Zone::pio(THR, 1, "io serial")];
        let coalesced = CoalescedIo::new(ring, zones, io.clone(), mmio.clone());
        Self {
            io,
            mmio,
            coalesced,
            log,
            serial,
        }
    }

    /// The guest writes THR and KVM queues it.
    fn queue(&self, byte: u8) {
        assert!(self.coalesced.ring.push(u64::from(THR), true, &[byte]));
    }

    fn out(&self, port: u16, value: u8) -> ExitAction {
        let data = [value];
        let exit = VcpuExit::IoOut(port, &data);
        drain_then_handle(exit, &self.io, &self.mmio, Some(&self.coalesced)).0
    }

    fn inb(&self, port: u16) -> u8 {
        let mut data = [0u8];
        let exit = VcpuExit::IoIn(port, &mut data);
        drain_then_handle(exit, &self.io, &self.mmio, Some(&self.coalesced));
        data[0]
    }

    /// What reached the console log.
    fn console(&self) -> String {
        self.serial.lock().unwrap().flush_console();
        self.log.contents()
    }
}

#[test]
fn a_queued_byte_is_sent_before_a_later_exit_sets_dlab() {
    let r = Rig::new();
    r.queue(b'A');
    // LCR with DLAB: 0x3f8 becomes the divisor latch from here on.
    assert_eq!(r.out(LCR, DLAB), ExitAction::Continue);
    // Queued after DLAB went on: a divisor byte, not output.
    r.queue(0x01);
    assert_eq!(r.inb(THR), 0x01, "the divisor latch reads back");
    assert_eq!(r.console(), "A", "the byte queued before DLAB was output");
}

#[test]
fn a_queued_divisor_byte_lands_before_dlab_is_cleared() {
    let r = Rig::new();
    r.out(LCR, DLAB);
    r.queue(0x03);
    // DLAB off (8N1): the queued byte must still be the divisor.
    r.out(LCR, 0x03);
    r.queue(b'B');
    r.out(LCR, DLAB);
    assert_eq!(r.inb(THR), 0x03);
    r.out(LCR, 0x03);
    assert_eq!(r.console(), "B");
}

#[test]
fn any_exit_drains_first_even_to_another_device() {
    let r = Rig::new();
    for b in b"hi" {
        r.queue(*b);
    }
    // Port 0x80 belongs to nobody; an MMIO exit goes elsewhere too.
    r.out(0x80, 0);
    assert_eq!(r.console(), "hi");
    r.queue(b'!');
    let mut data = [0u8; 4];
    let exit = VcpuExit::MmioRead(0xd000_0000, &mut data);
    drain_then_handle(exit, &r.io, &r.mmio, Some(&r.coalesced));
    assert_eq!(r.console(), "hi!");
    let counts = r.coalesced.counts();
    assert_eq!(counts.len(), 1);
    assert_eq!(
        (counts[0].kind.as_str(), counts[0].count),
        ("coalesced io serial", 3)
    );
}

#[test]
fn without_a_ring_exits_are_handled_as_before() {
    let r = Rig::new();
    let exit = VcpuExit::IoOut(THR, b"x");
    let (action, _) = drain_then_handle(exit, &r.io, &r.mmio, None);
    assert_eq!(action, ExitAction::Continue);
    assert_eq!(r.console(), "x");
}

#[test]
fn writes_outside_the_zones_are_not_applied() {
    let r = Rig::new();
    // KVM would never queue these for our zone; they are dropped.
    assert!(r.coalesced.ring.push(u64::from(LCR), true, &[DLAB]));
    assert!(r.coalesced.ring.push(u64::from(THR), false, b"m"));
    assert!(r.coalesced.ring.push(u64::from(THR), true, b"wide"));
    r.queue(b'k');
    assert_eq!(r.coalesced.drain(), 4);
    r.out(LCR, DLAB);
    assert_eq!(r.inb(THR), 0x0c, "the default divisor: nothing wrote it");
    r.out(LCR, 0x03);
    assert_eq!(r.console(), "k");
}

#[test]
fn concurrent_consumers_apply_each_write_once_in_order() {
    let r = Arc::new(Rig::new());
    let text: Vec<u8> = (0..5000u32).map(|i| b'a' + (i % 26) as u8).collect();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let consumers: Vec<_> = (0..3)
        .map(|_| {
            let (r, stop) = (r.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    r.coalesced.drain();
                }
            })
        })
        .collect();
    for b in &text {
        while !r.coalesced.ring.push(u64::from(THR), true, &[*b]) {
            std::thread::yield_now();
        }
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for c in consumers {
        c.join().unwrap();
    }
    r.coalesced.drain();
    assert!(r.coalesced.ring.is_empty());
    assert_eq!(r.console().as_bytes(), text.as_slice());
}

#[test]
fn registers_with_this_hosts_kvm_where_it_can_coalesce_port_io() {
    // Sets up a VM and a vCPU (no guest code runs).
    let Ok(kvm) = kvm_ioctls::Kvm::new() else {
        eprintln!("SKIP: /dev/kvm is not usable here");
        return;
    };
    let vm = kvm.create_vm().expect("KVM_CREATE_VM");
    let vcpu = vm.create_vcpu(0).expect("KVM_CREATE_VCPU");
    let can = vm.check_extension(kvm_ioctls::Cap::CoalescedPio)
        && vm.check_extension_int(kvm_ioctls::Cap::CoalescedMmio) > 0;
    let (io, mmio) = (Arc::new(Bus::new()), Arc::new(Bus::new()));
    let zones = vec![Zone::pio(THR, 1, "io serial")];
    let got = CoalescedIo::register(&vm, &vcpu, zones, io, mmio);
    assert_eq!(
        got.is_some(),
        can,
        "registered exactly where KVM can coalesce port I/O"
    );
    if let Some(c) = got {
        assert!(c.ring().is_empty(), "a fresh ring is empty");
        assert_eq!(c.drain(), 0);
        if super::ring::page_size() == 4096 {
            assert_eq!(c.ring().capacity(), 170);
        }
    }
}
