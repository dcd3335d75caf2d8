//! Exit codes (SPEC.md): 0 success; 1 not found; 2 invalid state;
//! 3 operation failed; 4 system requirements not met; 5 user cancelled.

pub const OK: i32 = 0;
pub const NOT_FOUND: i32 = 1;
pub const INVALID_STATE: i32 = 2;
pub const OPERATION_FAILED: i32 = 3;
pub const REQUIREMENTS: i32 = 4;
pub const CANCELLED: i32 = 5;

/// A failure that carries its own exit code.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct CodedError {
    pub code: i32,
    pub message: String,
}

impl CodedError {
    pub fn error(code: i32, message: impl Into<String>) -> anyhow::Error {
        anyhow::Error::new(Self {
            code,
            message: message.into(),
        })
    }
}

/// The exit code for an error: its own code, 4 for a host without KVM,
/// otherwise 3.
pub fn for_error(err: &anyhow::Error) -> i32 {
    if let Some(coded) = err.downcast_ref::<CodedError>() {
        return coded.code;
    }
    if let Some(vmm::StartError::Kvm(_)) = err.downcast_ref::<vmm::StartError>() {
        return REQUIREMENTS;
    }
    OPERATION_FAILED
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coded_errors_keep_their_code() {
        assert_eq!(for_error(&CodedError::error(NOT_FOUND, "x")), 1);
        assert_eq!(for_error(&anyhow::anyhow!("boom")), 3);
    }
}
