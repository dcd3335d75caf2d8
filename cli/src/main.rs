//! `keystone`: the Keystone Agent Sandbox command line.
//!
//! The binary is thin: it parses arguments, hands them to a command module
//! and turns errors into the exit codes SPEC.md lists.

mod agent;
mod embedded;
mod exit_code;
mod host_git;
mod logging;
mod shown;
mod signals;
mod terminal;
mod vm_check;
mod vm_run;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "keystone",
    version,
    about = "Run AI coding agents in micro-VMs"
)]
struct Cli {
    /// Log verbosity for the VMM and daemons (error, warn, info, debug, trace).
    #[arg(long, global = true, default_value = "warn", env = "KEYSTONE_LOG")]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Low-level VM commands (boot a kernel directly with the Keystone VMM).
    #[command(subcommand)]
    Vm(VmCommand),
    /// Sandboxes for AI coding agents (start, attach, sync, ...).
    #[command(subcommand)]
    Agent(agent::AgentCommand),
    /// One writable share of a sandbox, served from a namespace sandbox
    /// (started by the supervisor).
    #[command(name = "__share", hide = true)]
    Share(agent::ShareArgs),
}

#[derive(Subcommand)]
enum VmCommand {
    /// Boot a kernel with the serial console on this terminal.
    Run(vm_run::RunArgs),
    /// Lay out a minimal busybox root directory for `vm run --root-dir`.
    MakeRoot(vm_run::MakeRootArgs),
    /// Check this host's KVM: its kind, nested virtualization, and a
    /// self-test VM run (exit 0 when it works).
    Check(vm_check::CheckArgs),
}

fn main() {
    let process_start_ns = vmm::host::monotonic_ns();
    // Usage errors exit 1, not clap's 2: SPEC.md reserves 2 for "invalid state".
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() {
                exit_code::NOT_FOUND
            } else {
                exit_code::OK
            };
            let _ = e.print();
            std::process::exit(code);
        }
    };
    logging::init(cli.log_level.parse().unwrap_or(log::LevelFilter::Warn));
    let result = match cli.command {
        Command::Vm(VmCommand::Run(args)) => vm_run::run(args, process_start_ns),
        Command::Vm(VmCommand::MakeRoot(args)) => vm_run::make_root(args),
        Command::Vm(VmCommand::Check(args)) => vm_check::run(args),
        Command::Agent(command) => agent::run(command),
        Command::Share(args) => Ok(agent::share_main(args)),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(err) => {
            eprintln!("keystone: error: {}", error_text(&err));
            std::process::exit(exit_code::for_error(&err));
        }
    }
}

/// The error as printed: its chain, each line escaped (errors quote the
/// guest's words and the tails of its logs).
fn error_text(err: &anyhow::Error) -> String {
    shown::lines(&error_chain(err))
}

/// The error and its causes, skipping a cause whose text the message
/// before it already contains (library errors often embed their source).
fn error_chain(err: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_quoting_the_guest_prints_nothing_a_terminal_acts_on() {
        let cause = anyhow::anyhow!("git worktree add: {}", shown::HOSTILE);
        let err = cause.context("the sandbox said\nsee its log");
        let text = error_text(&err);
        assert!(shown::terminal_safe(&text), "{text:?}");
        assert!(text.contains("the sandbox said\nsee its log"), "{text}");
    }
}
