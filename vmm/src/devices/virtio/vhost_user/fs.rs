//! virtio-fs over vhost-user: the device configuration space and a
//! constructor for [`VhostUserDevice`] (virtio 1.2, section 5.11).
//!
//! The FUSE traffic itself never passes through the VMM: the backend
//! (virtiofsd-lite) reads the queues. Queue 0 is the high-priority queue,
//! queues 1 and up are request queues.

use std::os::unix::net::UnixStream;

use super::{VhostUserDevice, VhostUserError, MAX_QUEUES};
use crate::devices::virtio::device_type;

/// Length of the `tag` field of `struct virtio_fs_config`.
pub const TAG_LEN: usize = 36;
/// Size of `struct virtio_fs_config`: the tag and `num_request_queues`.
pub const CONFIG_LEN: usize = TAG_LEN + 4;

/// Builds `struct virtio_fs_config`: `tag` NUL-padded to 36 bytes (not
/// terminated when it is exactly 36), then `num_request_queues` in little
/// endian.
pub fn virtio_fs_config(tag: &str, num_request_queues: u32) -> Result<Vec<u8>, VhostUserError> {
    if tag.is_empty() || tag.len() > TAG_LEN || tag.contains('\0') {
        return Err(VhostUserError::InvalidTag(tag.to_owned()));
    }
    let mut config = vec![0u8; CONFIG_LEN];
    config[..tag.len()].copy_from_slice(tag.as_bytes());
    config[TAG_LEN..].copy_from_slice(&num_request_queues.to_le_bytes());
    Ok(config)
}

impl VhostUserDevice {
    /// A virtio-fs device with mount tag `tag`, one high-priority queue and
    /// `num_request_queues` request queues of `queue_size` entries, served
    /// by the vhost-user-fs backend at the other end of `stream`.
    pub fn fs(
        stream: UnixStream,
        tag: &str,
        num_request_queues: u32,
        queue_size: u16,
    ) -> Result<Self, VhostUserError> {
        let num_queues = usize::try_from(num_request_queues)
            .ok()
            .filter(|n| (1..MAX_QUEUES).contains(n))
            .ok_or(VhostUserError::RequestQueueCount(num_request_queues))?
            + 1;
        let config = virtio_fs_config(tag, num_request_queues)?;
        Self::new(stream, device_type::FS, num_queues, queue_size, config, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_is_tag_padded_then_le_queue_count() {
        let config = virtio_fs_config("workspace", 2).unwrap();
        assert_eq!(config.len(), 40);
        assert_eq!(&config[..9], b"workspace");
        assert!(config[9..36].iter().all(|b| *b == 0));
        assert_eq!(&config[36..], &[2, 0, 0, 0]);

        let long = "a".repeat(36);
        let config = virtio_fs_config(&long, 0x0102_0304).unwrap();
        assert_eq!(&config[..36], long.as_bytes());
        assert_eq!(&config[36..], &[4, 3, 2, 1]);
    }

    #[test]
    fn bad_tags_are_refused() {
        for tag in ["", "nul\0inside", &"a".repeat(37)] {
            assert!(matches!(
                virtio_fs_config(tag, 1),
                Err(VhostUserError::InvalidTag(_))
            ));
        }
    }

    #[test]
    fn request_queue_count_is_checked_before_talking_to_the_backend() {
        for n in [0, 256, u32::MAX] {
            let (a, _b) = UnixStream::pair().unwrap();
            assert!(matches!(
                VhostUserDevice::fs(a, "tag", n, 128),
                Err(VhostUserError::RequestQueueCount(_))
            ));
        }
    }
}
