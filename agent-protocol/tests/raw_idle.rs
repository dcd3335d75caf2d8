//! A guest that starts a raw stream and then says nothing does not hold a
//! host reader for ever once it set an idle deadline.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixListener;
use std::time::{Duration, Instant};

use keystone_agent_protocol::client::{unix_connector, AgentClient};
use keystone_agent_protocol::protocol::{
    expect_frame, write_frame, Frame, FrameKind, Hello, RawStreamRequest, Response,
};
use keystone_test_kit::ScratchDir;

#[test]
fn a_silent_raw_stream_times_out_at_its_idle_deadline() {
    let dir = ScratchDir::new("raw-idle");
    let path = dir.join("agent.sock");
    let listener = UnixListener::bind(&path).unwrap();
    std::thread::spawn(move || {
        let (conn, _) = listener.accept().unwrap();
        let mut r = BufReader::new(conn.try_clone().unwrap());
        let mut w = conn;
        expect_frame(&mut r).unwrap();
        write_frame(&mut w, &Frame::json(FrameKind::Hello, &Hello::current())).unwrap();
        expect_frame(&mut r).unwrap();
        write_frame(
            &mut w,
            &Frame::json(FrameKind::Response, &Response::Started { pid: 7 }),
        )
        .unwrap();
        // Then nothing, for longer than the test waits.
        let _ = r.fill_buf();
        std::thread::sleep(Duration::from_secs(60));
        let _ = w.flush();
    });
    let client = AgentClient::new(unix_connector(&path));
    let stream = client
        .raw_stream(RawStreamRequest {
            argv: vec!["cat".into()],
            ..Default::default()
        })
        .unwrap();
    let (mut reader, _writer) = stream.into_split();
    reader
        .set_idle_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let t = Instant::now();
    let mut buf = [0u8; 16];
    let err = reader.read(&mut buf).unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(30), "{err}");
    eprintln!("gave up after {:.2?}: {err}", t.elapsed());
}
