//! What a hostile guest cannot make the host's client do: wait forever for
//! a hello, hold a huge frame, or collect unbounded output.

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::time::{Duration, Instant};

use keystone_guest_agent::client::{unix_connector, AgentClient, ClientError, MAX_COLLECTED};
use keystone_guest_agent::protocol::{ExecRequest, ProtocolError, MAX_GUEST_FRAME};
use keystone_test_kit::ScratchDir;

/// A "guest agent" on a fresh Unix socket (in the folder returned with
/// it) that does `serve` with each connection it accepts.
fn fake_agent(serve: fn(std::os::unix::net::UnixStream)) -> (ScratchDir, std::path::PathBuf) {
    let dir = ScratchDir::new("host-limits");
    let path = dir.join("agent.sock");
    let listener = UnixListener::bind(&path).unwrap();
    std::thread::spawn(move || {
        for s in listener.incoming().flatten() {
            std::thread::spawn(move || serve(s));
        }
    });
    (dir, path)
}

#[test]
fn an_agent_that_never_says_hello_is_given_up_on() {
    let (_dir, path) = fake_agent(|mut s| {
        // Reads the host's hello, answers nothing, keeps the connection.
        let mut buf = [0u8; 1024];
        while s.read(&mut buf).is_ok_and(|n| n > 0) {}
    });
    let client = AgentClient::new(unix_connector(&path)).hello_timeout(Duration::from_secs(2));
    let t = Instant::now();
    let err = client.ping().unwrap_err();
    eprintln!("gave up after {:.2?}: {err}", t.elapsed());
    assert!(
        matches!(err, ClientError::Protocol(ProtocolError::Io(_))),
        "{err:?}"
    );
}

#[test]
fn a_frame_over_the_guest_limit_is_refused_before_it_is_read() {
    let (_dir, path) = fake_agent(|mut s| {
        let mut header = ((MAX_GUEST_FRAME + 1) as u32).to_le_bytes().to_vec();
        header.push(0x01); // Hello
        let _ = s.write_all(&header);
        // It would go on sending; the host must not wait for the bytes.
        let _ = s.write_all(&vec![b'{'; 4096]);
        std::thread::sleep(Duration::from_secs(30));
    });
    let client = AgentClient::new(unix_connector(&path));
    let err = client.ping().unwrap_err();
    assert!(
        matches!(err, ClientError::Protocol(ProtocolError::FrameTooLarge(n)) if n == MAX_GUEST_FRAME + 1),
        "{err:?}"
    );
}

#[test]
fn collected_output_stops_at_its_limit() {
    let dir = ScratchDir::new("host-limits-agent");
    let workspace = dir.path().to_path_buf();
    let path = dir.join("agent.sock");
    let listener = keystone_guest_agent::transport::AgentListener::unix(&path).unwrap();
    std::thread::spawn(move || {
        keystone_guest_agent::agent::serve(
            &listener,
            keystone_guest_agent::agent::AgentConfig {
                workspace_root: workspace,
                ..Default::default()
            },
        )
    });
    let client = AgentClient::new(unix_connector(&path));
    let over = format!("head -c {} /dev/zero", MAX_COLLECTED + 1);
    let err = client
        .exec_request_output(ExecRequest::new(&["sh", "-c", &over]))
        .unwrap_err();
    assert!(
        matches!(err, ClientError::OutputTooLarge("stdout")),
        "{err:?}"
    );
    let at = format!("head -c {MAX_COLLECTED} /dev/zero");
    let out = client
        .exec_request_output(ExecRequest::new(&["sh", "-c", &at]))
        .unwrap();
    assert_eq!(out.stdout.len(), MAX_COLLECTED);
}
