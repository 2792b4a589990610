//! `supermachine boot`: real guests under QEMU (TCG where there is no hardware
//! virtualization), booted from the OCI layouts scripts/make-test-images.py builds.

mod common;

use common::*;

#[test]
fn runs_a_command_and_returns_its_exit_code() {
    let o = boot(&[&image("busybox"), "--", "/bin/sh", "-c", "echo hi; exit 3"]);
    assert_code(&o, 3);
    assert_eq!(stdout(&o), "hi\n");
}

#[test]
fn stdout_and_stderr_stay_apart() {
    let o = boot(&[
        &image("busybox"),
        "--",
        "/bin/sh",
        "-c",
        "echo out; echo err >&2",
    ]);
    assert_code(&o, 0);
    assert_eq!(stdout(&o), "out\n");
    assert!(stderr(&o).contains("err\n"), "{}", stderr(&o));
}

#[test]
fn entrypoint_and_cmd_from_the_image() {
    let o = boot(&[&image("layered")]);
    assert_code(&o, 0);
    assert_eq!(stdout(&o), "entry default-cmd\n");
}

#[test]
fn argv_replaces_cmd_but_keeps_entrypoint() {
    let o = boot(&[&image("layered"), "--", "one", "two"]);
    assert_code(&o, 0);
    assert_eq!(stdout(&o), "entry one two\n");
}

#[test]
fn entrypoint_override_clears_the_image_cmd() {
    // docker: --entrypoint resets Cmd, so echo gets no arguments.
    let o = boot(&["--entrypoint", "/bin/echo", &image("layered")]);
    assert_code(&o, 0);
    assert_eq!(stdout(&o), "\n");
    let o = boot(&["--entrypoint", "/bin/echo", &image("layered"), "--", "x"]);
    assert_eq!(stdout(&o), "x\n");
}

#[test]
fn env_workdir_and_user_follow_the_image_and_overrides() {
    let script = r#"echo "$GREETING|$SHARED|$NEW|$HOME|$PATH"; pwd; id -u; id -g; id -G"#;
    let o = boot(&[
        "--entrypoint",
        "/bin/sh",
        "-e",
        "SHARED=override",
        "-e",
        "NEW=1",
        &image("layered"),
        "--",
        "-c",
        script,
    ]);
    assert_code(&o, 0);
    assert_eq!(
        stdout(&o),
        "hello from the image|override|1|/home/app|/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n\
         /app\n1000\n1000\n1000 50\n"
    );

    let o = boot(&[
        "--entrypoint",
        "/bin/sh",
        "-u",
        "0:50",
        "-w",
        "/srv/new",
        &image("layered"),
        "--",
        "-c",
        "pwd; id -u; id -g",
    ]);
    assert_code(&o, 0);
    assert_eq!(
        stdout(&o),
        "/srv/new\n0\n50\n",
        "workdir is created like docker does"
    );
}

#[test]
fn unknown_user_is_an_error() {
    let o = boot(&["-u", "nobody-here", &image("busybox"), "--", "true"]);
    assert_fails_with(&o, "unable to find user nobody-here");
}

#[test]
fn overlay_semantics_whiteout_opaque_hardlink_symlink() {
    let script = "ls /data; echo --; ls /opq; echo --; \
                  stat -c '%i %h' /links/target.txt /links/hard.txt; \
                  cat /links/sym.txt; stat -c '%a %U' /app/suid; \
                  test -e /data/gone.txt && echo WHITEOUT-BROKEN; \
                  echo new > /app/written && cat /app/written";
    let o = boot(&[
        "--entrypoint",
        "/bin/sh",
        &image("layered"),
        "--",
        "-c",
        script,
    ]);
    assert_code(&o, 0);
    let out = stdout(&o);
    let parts: Vec<&str> = out.split("--\n").collect();
    assert_eq!(parts[0], "keep.txt\n", "whited-out file must be absent");
    assert_eq!(
        parts[1], "new1\n",
        "opaque dir shows only the upper layer: {out}"
    );
    let lines: Vec<&str> = parts[2].lines().collect();
    let (a, b) = (lines[0], lines[1]);
    assert_eq!(a, b, "hard link shares the inode");
    assert!(a.ends_with(" 2"), "link count 2: {a}");
    assert_eq!(lines[2], "linked content");
    assert_eq!(lines[3], "4755 root", "setuid bit and owner kept");
    assert_eq!(lines[4], "new", "the root is writable");
    assert_eq!(lines.len(), 5, "{out}");
}

#[test]
fn missing_command_exits_127_and_non_executable_126() {
    let o = boot(&[&image("busybox"), "--", "no-such-command"]);
    assert_code(&o, 127);
    assert!(stderr(&o).contains("no-such-command"), "{}", stderr(&o));
    let o = boot(&[&image("busybox"), "--", "/etc/passwd"]);
    assert_code(&o, 126);
}

#[test]
fn killed_by_a_signal_is_128_plus_signum() {
    let o = boot(&[&image("busybox"), "--", "/bin/sh", "-c", "kill -9 $$"]);
    assert_code(&o, 137);
}

#[test]
fn hostname_memory_and_vcpus_are_applied() {
    let o = boot(&[
        "--hostname",
        "box1",
        "--memory",
        "200",
        "--vcpus",
        "2",
        &image("busybox"),
        "--",
        "/bin/sh",
        "-c",
        "hostname; nproc; grep MemTotal /proc/meminfo",
    ]);
    assert_code(&o, 0);
    let out = stdout(&o);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "box1");
    assert_eq!(lines[1], "2");
    let kib: u64 = lines[2].split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(
        (150_000..205_000).contains(&kib),
        "MemTotal {kib} KiB for --memory 200"
    );
}

#[test]
fn large_output_arrives_intact() {
    // 256 KiB through the control channel, in order. Bounded: in the nested kvm stage this
    // is the densest VM-exit load of the suite, and its guest once ran on for 15+ minutes
    // there (it takes 1-2 minutes when it works); a failure is retried alone.
    let o = boot_within(
        &[&image("busybox"), "--", "/bin/sh", "-c", "seq 1 40000"],
        std::time::Duration::from_secs(300),
    );
    assert_code(&o, 0);
    let expected: String = (1..=40000).map(|i| format!("{i}\n")).collect();
    assert!(
        stdout(&o) == expected,
        "output differs (got {} bytes)",
        o.stdout.len()
    );
}

#[test]
fn a_multi_arch_index_runs_its_amd64_image() {
    let o = boot(&[&image("multiarch"), "--", "/bin/sh", "-c", "echo $ARCH"]);
    assert_code(&o, 0);
    assert_eq!(stdout(&o), "amd64\n");
}
