//! Unit tests of the virtio-mmio transport, with fake guest memory and a
//! recording test device.

use std::sync::{Arc, Mutex};

use vm_memory::GuestAddress;

use super::*;
use crate::devices::virtio::{ActivateContext, ActivateError};
use crate::vstate::memory::create_memfd_memory;

const FEATURE_INDIRECT: u64 = 1 << 28;
const FEATURE_DEVICE_BIT0: u64 = 1;
const OFFERED: u64 = VIRTIO_F_VERSION_1 | FEATURE_INDIRECT | FEATURE_DEVICE_BIT0;

#[derive(Default)]
struct Recorded {
    activations: Vec<ActivateContext>,
    resets: usize,
    config_writes: Vec<(u64, Vec<u8>)>,
}

struct TestDevice {
    config: Vec<u8>,
    fail_activate: bool,
    recorded: Arc<Mutex<Recorded>>,
}

impl VirtioDevice for TestDevice {
    fn device_type(&self) -> u32 {
        crate::devices::virtio::device_type::FS
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[256, 128]
    }
    fn avail_features(&self) -> u64 {
        OFFERED
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            let at = offset
                .checked_add(i as u64)
                .and_then(|o| usize::try_from(o).ok());
            if let Some(value) = at.and_then(|o| self.config.get(o)) {
                *byte = *value;
            }
        }
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.recorded
            .lock()
            .unwrap()
            .config_writes
            .push((offset, data.to_vec()));
    }
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        if self.fail_activate {
            return Err(ActivateError::Other("test failure".into()));
        }
        self.recorded.lock().unwrap().activations.push(ctx);
        Ok(())
    }
    fn reset(&mut self) -> bool {
        self.recorded.lock().unwrap().resets += 1;
        true
    }
}

fn transport_with(fail_activate: bool) -> (MmioTransport, Arc<Mutex<Recorded>>) {
    let recorded = Arc::new(Mutex::new(Recorded::default()));
    let device = TestDevice {
        config: (0u8..16).map(|b| 0xa0 + b).collect(),
        fail_activate,
        recorded: recorded.clone(),
    };
    let mem = create_memfd_memory(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    (MmioTransport::new(Box::new(device), mem).unwrap(), recorded)
}

fn transport() -> (MmioTransport, Arc<Mutex<Recorded>>) {
    transport_with(false)
}

fn r(t: &mut MmioTransport, offset: u64) -> u32 {
    let mut data = [0xffu8; 4];
    t.read(offset, &mut data);
    u32::from_le_bytes(data)
}

fn w(t: &mut MmioTransport, offset: u64, value: u32) {
    t.write(offset, &value.to_le_bytes());
}

fn add_status(t: &mut MmioTransport, bit: u32) {
    let old = r(t, reg::STATUS);
    w(t, reg::STATUS, old | bit);
}

/// ACKNOWLEDGE, DRIVER, ack `features` through both windows, FEATURES_OK.
fn negotiate(t: &mut MmioTransport, features: u64) {
    add_status(t, status::ACKNOWLEDGE);
    add_status(t, status::DRIVER);
    w(t, reg::DRIVER_FEATURES_SEL, 0);
    w(t, reg::DRIVER_FEATURES, features as u32);
    w(t, reg::DRIVER_FEATURES_SEL, 1);
    w(t, reg::DRIVER_FEATURES, (features >> 32) as u32);
    add_status(t, status::FEATURES_OK);
}

fn setup_queue(t: &mut MmioTransport, index: u32, size: u32, desc: u64, avail: u64, used: u64) {
    w(t, reg::QUEUE_SEL, index);
    w(t, reg::QUEUE_NUM, size);
    w(t, reg::QUEUE_DESC_LOW, desc as u32);
    w(t, reg::QUEUE_DESC_HIGH, (desc >> 32) as u32);
    w(t, reg::QUEUE_DRIVER_LOW, avail as u32);
    w(t, reg::QUEUE_DRIVER_HIGH, (avail >> 32) as u32);
    w(t, reg::QUEUE_DEVICE_LOW, used as u32);
    w(t, reg::QUEUE_DEVICE_HIGH, (used >> 32) as u32);
    w(t, reg::QUEUE_READY, 1);
}

#[test]
fn identifies_as_modern_virtio_mmio() {
    let (mut t, _) = transport();
    assert_eq!(r(&mut t, reg::MAGIC_VALUE), 0x7472_6976);
    assert_eq!(r(&mut t, reg::VERSION), 2);
    assert_eq!(r(&mut t, reg::DEVICE_ID), 26);
    assert_eq!(r(&mut t, reg::VENDOR_ID), 0x4b53);
    assert_eq!(r(&mut t, reg::CONFIG_GENERATION), 0);
    assert_eq!(r(&mut t, reg::STATUS), 0);
    assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), 0);
    assert_eq!(r(&mut t, reg::QUEUE_NUM_MAX), 256);
    w(&mut t, reg::QUEUE_SEL, 1);
    assert_eq!(r(&mut t, reg::QUEUE_NUM_MAX), 128);
    w(&mut t, reg::QUEUE_SEL, 2);
    assert_eq!(r(&mut t, reg::QUEUE_NUM_MAX), 0);
    assert_eq!(r(&mut t, reg::SHM_LEN_LOW), u32::MAX);
    let ioevents: Vec<(u64, u32)> = t.ioevents().map(|(_, off, dm)| (off, dm)).collect();
    assert_eq!(ioevents, vec![(0x50, 0), (0x50, 1)]);
}

#[test]
fn device_features_through_both_windows() {
    let (mut t, _) = transport();
    assert_eq!(r(&mut t, reg::DEVICE_FEATURES), OFFERED as u32);
    w(&mut t, reg::DEVICE_FEATURES_SEL, 1);
    assert_eq!(r(&mut t, reg::DEVICE_FEATURES), (OFFERED >> 32) as u32);
    w(&mut t, reg::DEVICE_FEATURES_SEL, 2);
    assert_eq!(r(&mut t, reg::DEVICE_FEATURES), 0);
}

#[test]
fn features_ok_accepted_for_offered_features_with_version_1() {
    let (mut t, _) = transport();
    negotiate(&mut t, VIRTIO_F_VERSION_1 | FEATURE_DEVICE_BIT0);
    assert_eq!(
        r(&mut t, reg::STATUS),
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK
    );
    assert_eq!(t.acked_features, VIRTIO_F_VERSION_1 | FEATURE_DEVICE_BIT0);
    // Features are frozen once FEATURES_OK is set.
    w(&mut t, reg::DRIVER_FEATURES_SEL, 0);
    w(&mut t, reg::DRIVER_FEATURES, 0xffff_ffff);
    assert_eq!(t.acked_features, VIRTIO_F_VERSION_1 | FEATURE_DEVICE_BIT0);
}

#[test]
fn features_ok_refused_for_unoffered_features_or_missing_version_1() {
    let (mut t, _) = transport();
    negotiate(&mut t, VIRTIO_F_VERSION_1 | (1 << 5));
    assert_eq!(r(&mut t, reg::STATUS) & status::FEATURES_OK, 0);

    let (mut t, _) = transport();
    negotiate(&mut t, FEATURE_DEVICE_BIT0);
    assert_eq!(r(&mut t, reg::STATUS) & status::FEATURES_OK, 0);
    // DRIVER_OK without FEATURES_OK does not activate.
    add_status(&mut t, status::DRIVER_OK);
    assert_eq!(r(&mut t, reg::STATUS) & status::DRIVER_OK, 0);
    assert!(!t.is_activated());
}

#[test]
fn features_before_driver_status_are_ignored() {
    let (mut t, _) = transport();
    w(&mut t, reg::DRIVER_FEATURES, 0xffff_ffff);
    assert_eq!(t.acked_features, 0);
    // DRIVER without ACKNOWLEDGE is refused.
    w(&mut t, reg::STATUS, status::DRIVER);
    assert_eq!(r(&mut t, reg::STATUS), 0);
}

#[test]
fn driver_ok_activates_with_exact_queue_layout() {
    let (mut t, recorded) = transport();
    negotiate(&mut t, OFFERED);
    setup_queue(&mut t, 0, 128, 0x1_2345_6000, 0x7000, 0x8000_0000_8000);
    setup_queue(&mut t, 1, 64, 0x9000, 0xa000, 0xb000);
    assert_eq!(r(&mut t, reg::QUEUE_READY), 1);
    add_status(&mut t, status::DRIVER_OK);

    assert!(t.is_activated());
    assert_eq!(
        r(&mut t, reg::STATUS) & status::DRIVER_OK,
        status::DRIVER_OK
    );
    assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), INT_VRING);
    let rec = recorded.lock().unwrap();
    assert_eq!(rec.activations.len(), 1);
    let ctx = &rec.activations[0];
    assert_eq!(ctx.acked_features, OFFERED);
    assert_eq!(
        ctx.queues,
        vec![
            QueueConfig {
                index: 0,
                size: 128,
                desc_table: 0x1_2345_6000,
                avail_ring: 0x7000,
                used_ring: 0x8000_0000_8000,
            },
            QueueConfig {
                index: 1,
                size: 64,
                desc_table: 0x9000,
                avail_ring: 0xa000,
                used_ring: 0xb000,
            },
        ]
    );
    // The kicks and call handed over are the transport's own eventfds.
    assert_eq!(ctx.kicks.len(), 2);
    ctx.kicks[1].write(3).unwrap();
    assert_eq!(t.kicks[1].read().unwrap(), 3);
    ctx.call.write(1).unwrap();
    assert_eq!(t.call_eventfd().read().unwrap(), 1);
}

#[test]
fn only_ready_queues_are_activated_and_queue_registers_freeze() {
    let (mut t, recorded) = transport();
    negotiate(&mut t, OFFERED);
    setup_queue(&mut t, 1, 32, 0x1000, 0x2000, 0x3000);
    add_status(&mut t, status::DRIVER_OK);
    {
        let rec = recorded.lock().unwrap();
        let queues = &rec.activations[0].queues;
        assert_eq!(queues.len(), 1);
        assert_eq!(queues[0].index, 1);
        assert_eq!(rec.activations[0].kicks.len(), 1);
    }
    // After DRIVER_OK the queue registers are read-only.
    w(&mut t, reg::QUEUE_SEL, 1);
    w(&mut t, reg::QUEUE_READY, 0);
    w(&mut t, reg::QUEUE_NUM, 16);
    assert_eq!(r(&mut t, reg::QUEUE_READY), 1);
    assert_eq!(t.queues[1].size, 32);
    // A second DRIVER_OK write does not activate again.
    add_status(&mut t, status::DRIVER_OK);
    assert_eq!(recorded.lock().unwrap().activations.len(), 1);
}

#[test]
fn queue_num_must_be_a_power_of_two_up_to_max() {
    let (mut t, _) = transport();
    w(&mut t, reg::QUEUE_SEL, 1);
    for bad in [0, 3, 100, 256, u32::MAX] {
        w(&mut t, reg::QUEUE_NUM, bad);
        assert_eq!(t.queues[1].size, 128, "QueueNum {bad} must be refused");
    }
    w(&mut t, reg::QUEUE_NUM, 64);
    assert_eq!(t.queues[1].size, 64);
    // Queue writes with QueueSel out of range do nothing.
    w(&mut t, reg::QUEUE_SEL, 9);
    w(&mut t, reg::QUEUE_NUM, 2);
    w(&mut t, reg::QUEUE_READY, 1);
    assert_eq!(r(&mut t, reg::QUEUE_READY), 0);
}

#[test]
fn status_zero_resets_device_and_transport_state() {
    let (mut t, recorded) = transport();
    negotiate(&mut t, OFFERED);
    setup_queue(&mut t, 0, 16, 0x1000, 0x2000, 0x3000);
    add_status(&mut t, status::DRIVER_OK);
    t.notify_config_change();
    w(&mut t, reg::STATUS, 0);

    assert_eq!(recorded.lock().unwrap().resets, 1);
    assert!(!t.is_activated());
    assert_eq!(r(&mut t, reg::STATUS), 0);
    assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), 0);
    assert_eq!(r(&mut t, reg::QUEUE_READY), 0);
    assert_eq!(t.acked_features, 0);
    assert_eq!(t.queues[0].size, 256);
    assert_eq!(t.queues[0].desc_table, 0);
    // Negotiation starts over: nothing acked means no VERSION_1.
    add_status(&mut t, status::ACKNOWLEDGE);
    add_status(&mut t, status::DRIVER);
    add_status(&mut t, status::FEATURES_OK);
    assert_eq!(r(&mut t, reg::STATUS) & status::FEATURES_OK, 0);
    // A reset before activation does not call into the device.
    w(&mut t, reg::STATUS, 0);
    assert_eq!(recorded.lock().unwrap().resets, 1);
}

#[test]
fn status_bits_cannot_be_cleared_without_reset() {
    let (mut t, _) = transport();
    negotiate(&mut t, OFFERED);
    w(&mut t, reg::STATUS, status::ACKNOWLEDGE);
    assert_eq!(
        r(&mut t, reg::STATUS),
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK
    );
}

#[test]
fn failed_activation_sets_device_needs_reset() {
    let (mut t, _) = transport_with(true);
    negotiate(&mut t, OFFERED);
    setup_queue(&mut t, 0, 16, 0x1000, 0x2000, 0x3000);
    add_status(&mut t, status::DRIVER_OK);
    assert!(!t.is_activated());
    let st = r(&mut t, reg::STATUS);
    assert_ne!(st & status::DEVICE_NEEDS_RESET, 0);
    assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), INT_CONFIG);
    assert_eq!(t.call_eventfd().read().unwrap(), 1);
    // The driver cannot clear it by writing the status back...
    w(&mut t, reg::STATUS, st & !status::DEVICE_NEEDS_RESET);
    assert_ne!(r(&mut t, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
    // ...only a reset does.
    w(&mut t, reg::STATUS, 0);
    assert_eq!(r(&mut t, reg::STATUS), 0);
}

#[test]
fn config_space_is_forwarded_with_relative_offsets_and_any_width() {
    let (mut t, recorded) = transport();
    let mut two = [0u8; 2];
    t.read(0x102, &mut two);
    assert_eq!(two, [0xa2, 0xa3]);
    let mut one = [0u8; 1];
    t.read(0x10f, &mut one);
    assert_eq!(one, [0xaf]);
    let mut eight = [0x55u8; 8];
    t.read(0x10c, &mut eight);
    assert_eq!(eight, [0xac, 0xad, 0xae, 0xaf, 0, 0, 0, 0]);
    t.write(0x104, &[1, 2, 3]);
    assert_eq!(
        recorded.lock().unwrap().config_writes,
        vec![(4, vec![1, 2, 3])]
    );
}

#[test]
fn config_change_interrupt_and_ack() {
    let (mut t, _) = transport();
    t.notify_config_change();
    assert_eq!(r(&mut t, reg::CONFIG_GENERATION), 1);
    assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), INT_CONFIG);
    assert_eq!(t.call_eventfd().read().unwrap(), 1);
    w(&mut t, reg::INTERRUPT_ACK, INT_VRING);
    assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), INT_CONFIG);
    w(&mut t, reg::INTERRUPT_ACK, INT_CONFIG);
    assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), 0);
}

#[test]
fn queue_notify_fires_the_kick_eventfd() {
    let (mut t, _) = transport();
    w(&mut t, reg::QUEUE_NOTIFY, 1);
    w(&mut t, reg::QUEUE_NOTIFY, 1);
    assert_eq!(t.kicks[1].read().unwrap(), 2);
    assert!(t.kicks[0].read().is_err(), "queue 0 was not kicked");
    w(&mut t, reg::QUEUE_NOTIFY, 7);
    w(&mut t, reg::QUEUE_NOTIFY, u32::MAX);
}

#[test]
fn junk_widths_and_offsets_never_panic() {
    let (mut t, _) = transport();
    // Non-32-bit register accesses read as zero and write nothing.
    let mut two = [0xffu8; 2];
    t.read(reg::MAGIC_VALUE, &mut two);
    assert_eq!(two, [0, 0]);
    t.write(reg::STATUS, &[status::ACKNOWLEDGE as u8]);
    assert_eq!(r(&mut t, reg::STATUS), 0);

    for offset in (0..0x120).chain([0xfff, 0x1000, u64::MAX - 3, u64::MAX]) {
        for len in [0usize, 1, 2, 3, 4, 8] {
            let mut buf = vec![0xa5u8; len];
            t.read(offset, &mut buf);
            t.write(offset, &buf);
        }
        w(&mut t, offset, 0xffff_ffff);
        w(&mut t, offset, 0);
        r(&mut t, offset);
    }
}

#[test]
fn cmdline_arg_uses_linux_syntax() {
    assert_eq!(
        device_cmdline_arg(0xd000_0000, 0x1000, 5),
        "virtio_mmio.device=4K@0xd0000000:5"
    );
    assert_eq!(
        device_cmdline_arg(0x1_0000_0000, 0x20_0000, 12),
        "virtio_mmio.device=2M@0x100000000:12"
    );
    assert_eq!(
        device_cmdline_arg(0x1000, 0x200, 1),
        "virtio_mmio.device=512@0x1000:1"
    );
}
