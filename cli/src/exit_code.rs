//! Exit codes (SPEC.md): 0 success; 1 not found; 2 invalid state;
//! 3 operation failed; 4 system requirements not met; 5 user cancelled.

pub const OK: i32 = 0;
pub const NOT_FOUND: i32 = 1;
pub const INVALID_STATE: i32 = 2;
pub const OPERATION_FAILED: i32 = 3;
pub const REQUIREMENTS: i32 = 4;
pub const CANCELLED: i32 = 5;

/// A failure that carries its own exit code, and what caused it.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct CodedError {
    pub code: i32,
    pub message: String,
    #[source]
    pub source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl CodedError {
    pub fn error(code: i32, message: impl Into<String>) -> anyhow::Error {
        anyhow::Error::new(Self {
            code,
            message: message.into(),
            source: None,
        })
    }

    /// `message`, caused by `source`, leaving with `code`.
    pub fn because(
        code: i32,
        message: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> anyhow::Error {
        anyhow::Error::new(Self {
            code,
            message: message.into(),
            source: Some(Box::new(source)),
        })
    }
}

/// The exit code for an error: the first code its chain carries (a
/// `CodedError`'s, a backend error's), 4 for a host without KVM,
/// otherwise 3.
pub fn for_error(err: &anyhow::Error) -> i32 {
    for cause in err.chain() {
        if let Some(coded) = cause.downcast_ref::<CodedError>() {
            return coded.code;
        }
        if let Some(backend) = cause.downcast_ref::<crate::agent::BackendError>() {
            return backend.exit_code();
        }
        if let Some(vmm::StartError::Kvm(_)) = cause.downcast_ref::<vmm::StartError>() {
            return REQUIREMENTS;
        }
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
