//! The demo agent: a tarball whose `control` script runs a small background process that
//! writes a line to `demo.log` every few seconds, tracked by a pid file, as real agents do.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use md5::Digest as _;

/// Name of the demo agent.
pub const AGENT: &str = "demo-agent";

fn control_script(version: &str) -> String {
    format!(
        r#"#!/bin/sh
# control script of {AGENT} {version}: start | stop | status
cd "$(dirname "$0")" || exit 1
running() {{ [ -s run.pid ] && kill -0 "$(cat run.pid)" 2>/dev/null; }}
case "$1" in
  start)
    running && {{ echo started; exit 0; }}
    nohup sh -c 'while true; do date "+%T {AGENT} {version} alive" >> demo.log; sleep 5; done' \
      </dev/null >/dev/null 2>&1 &
    echo $! > run.pid
    echo started ;;
  stop)
    running && kill "$(cat run.pid)"
    rm -f run.pid
    echo stoped ;;
  status)
    if running; then echo started; else echo stoped; fi ;;
  *) echo "usage: control start|stop|status" >&2; exit 2 ;;
esac
"#
    )
}

/// Writes `{AGENT}-{version}.tar.gz` and its `.md5` into `dir`, as an operator would publish
/// a release into ops-meta's `tarballDir`.
pub fn publish(dir: &Path, version: &str) -> Result<()> {
    let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::default(),
    ));
    let files: [(&str, u32, String); 2] = [
        ("control", 0o755, control_script(version)),
        (
            "README",
            0o644,
            format!("{AGENT} {version}: a demo agent\n"),
        ),
    ];
    for (path, mode, body) in &files {
        let mut header = tar::Header::new_gnu();
        header.set_size(body.len() as u64);
        header.set_mode(*mode);
        header.set_mtime(0);
        header.set_cksum();
        builder.append_data(&mut header, path, body.as_bytes())?;
    }
    let gz = builder.into_inner()?.finish()?;
    let file = proto::legacy::tarball_file(AGENT, version);
    let md5 = hex::encode(md5::Md5::digest(&gz));
    std::fs::File::create(dir.join(&file))
        .and_then(|mut f| f.write_all(&gz))
        .with_context(|| format!("write {file}"))?;
    std::fs::write(
        dir.join(format!("{file}.md5")),
        proto::legacy::format_md5_file(&md5, &file),
    )
    .with_context(|| format!("write {file}.md5"))?;
    Ok(())
}
