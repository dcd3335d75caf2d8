//! `keystone agent forward [NAME] GUEST_PORT [HOST_PORT]`: raw TCP from
//! the host's 127.0.0.1:HOST_PORT (default: the guest port's number) to a
//! guest port, like `kubectl port-forward`, until interrupted (Ctrl-C) or
//! until the sandbox stops. The host port must be free on both 127.0.0.1
//! and ::1; the guest agent's own ports are refused. For HTTP the proxy's
//! URLs need no command; this is for databases and other TCP services.

use std::cell::Cell;
use std::time::{Duration, Instant};

use anyhow::Result;

use super::super::microvm::{self, ForwardError};
use super::super::state::{ProcProbe, StateRecord};
use super::super::{Context, ForwardArgs};
use crate::exit_code::{self, CodedError};

/// How often the sandbox's state is looked at while forwarding.
const ALIVE_CHECK: Duration = Duration::from_secs(1);

/// Why the command's arguments name no sandbox and ports.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
enum ArgsError {
    #[error("{0:?} is not a port (1 to 65535)")]
    NotAPort(String),
    #[error("expected [NAME] GUEST_PORT [HOST_PORT]")]
    Count,
}

/// `(sandbox, guest port, host port)` from the command's arguments: a
/// first argument that is not a port, or the first of three, names the
/// sandbox (a sandbox named by digits only needs all three).
fn parse_args(args: &[String]) -> Result<(Option<&str>, u16, u16), ArgsError> {
    let port = |s: &str| -> Result<u16, ArgsError> {
        match s.parse::<u16>() {
            Ok(p) if p > 0 => Ok(p),
            _ => Err(ArgsError::NotAPort(s.to_string())),
        }
    };
    let is_port = |s: &str| port(s).is_ok();
    match args {
        [g] => Ok((None, port(g)?, port(g)?)),
        [a, b] if is_port(a) => Ok((None, port(a)?, port(b)?)),
        [name, g] => Ok((Some(name), port(g)?, port(g)?)),
        [name, g, h] => Ok((Some(name), port(g)?, port(h)?)),
        _ => Err(ArgsError::Count),
    }
}

/// `keystone agent forward`.
pub fn forward(ctx: &Context, args: &ForwardArgs) -> Result<i32> {
    let (name, guest_port, host_port) = parse_args(&args.args)
        .map_err(|e| CodedError::error(exit_code::NOT_FOUND, format!("forward: {e}")))?;
    let (name, entry) = ctx.resolve(name)?;
    let spec = ctx.spec(&name, &entry)?;
    let active =
        || StateRecord::load_checked(&spec.paths, &name, &ProcProbe).is_ok_and(|r| r.is_active());
    if !active() {
        return Err(CodedError::error(
            exit_code::INVALID_STATE,
            format!("sandbox {name} is not running; start it with `keystone agent start {name}`"),
        ));
    }
    let last = Cell::new(Instant::now());
    let alive = || {
        if last.get().elapsed() < ALIVE_CHECK {
            return true;
        }
        last.set(Instant::now());
        active()
    };
    let mut ready = || {
        println!(
            "Forwarding 127.0.0.1:{host_port} to port {guest_port} in sandbox {name} \
             (raw TCP; Ctrl-C stops)"
        );
    };
    // What happens to the connections is this command's output.
    log::set_max_level(log::max_level().max(log::LevelFilter::Info));
    match microvm::forward_port(&spec, guest_port, host_port, &alive, &mut ready) {
        Ok(()) => Ok(exit_code::OK),
        Err(e @ ForwardError::AgentPort(_)) => {
            Err(CodedError::error(exit_code::NOT_FOUND, e.to_string()))
        }
        Err(e) => Err(CodedError::error(
            exit_code::OPERATION_FAILED,
            e.to_string(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<(Option<String>, u16, u16), ArgsError> {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        parse_args(&args).map(|(n, g, h)| (n.map(str::to_string), g, h))
    }

    #[test]
    fn arguments_name_sandbox_and_ports() {
        assert_eq!(parse(&["5432"]), Ok((None, 5432, 5432)));
        assert_eq!(parse(&["5432", "15432"]), Ok((None, 5432, 15432)));
        assert_eq!(parse(&["db", "5432"]), Ok((Some("db".into()), 5432, 5432)));
        assert_eq!(
            parse(&["db", "5432", "15432"]),
            Ok((Some("db".into()), 5432, 15432))
        );
        assert_eq!(
            parse(&["8000", "5432", "5432"]),
            Ok((Some("8000".into()), 5432, 5432))
        );
        for bad in [
            &["0"][..],
            &["70000"],
            &["db", "x"],
            &["db", "1", "0"],
            &[],
            &["a", "1", "2", "3"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }
}
