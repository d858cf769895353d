//! The man page: clap's rendering of the options (clap_mangen) with the sections an operator
//! looks for after them. Shared by `examples/gen_man.rs` and the drift test.

/// Sections after OPTIONS, in roff.
const EXTRA: &str = r#".SH "MOUNT HELPER AND FSTAB"
mount(8) runs \fB/sbin/mount.s3mount\fR (installed by the package) for \fBmount \-t s3mount\fR
and for fstab lines of type \fBs3mount\fR; options go in the fourth field as \fB\-o\fR items
(any long option without dashes, \fB_\fR for \fB\-\fR):
.PP
.nf
my\-bucket:/logs  /mnt/logs  s3mount  _netdev,nofail,ro,allow_other,region=eu\-west\-1  0 0
.fi
.PP
The helper's own flags (\fB\-f\fR fake, \fB\-s\fR, \fB\-n\fR, \fB\-v\fR) are accepted. s3fs's option
names (\fBurl=\fR, \fBuse_path_request_style\fR, \fBpasswd_file=\fR, ...) are taken where s3mount
has the same thing and refused with the s3mount spelling otherwise. Mounts show as type
\fBfuse.s3mount\fR (\fBfindmnt \-t fuse.s3mount\fR).
.SH "STATUS"
\fBs3mount status\fR [\fIMOUNTPOINT\fR] [\fB\-\-json\fR] reports each mount of the user:
source, endpoint, options given, uptime, store capabilities, files being written, commits that
failed (and where their data is kept), memory and cache use, and the worker restarts of a
supervised mount.
.SH "SUPERVISED MOUNTS AND UPGRADE"
Unless \fB\-\-no\-supervise\fR is given, the process that mounts keeps the kernel connection
and a worker process serves it; a worker that dies is replaced within about 0.1 s, and the requests it was
serving are sent again to the new one (Linux 6.9 or later). Files open for reading,
directories being listed and files being written go on (a written file's bytes are kept on
local disk before each write returns; one past \fB\-\-spool\-limit\fR fails with EIO instead).
Five deaths within a minute unmount. \fBs3mount upgrade\fR \fIMOUNTPOINT\fR hands such a mount to a worker started
from the binary installed now, once every file being written can go on there (exit status 0
handed over, 1 not within \fB\-\-timeout\fR seconds, 2 not a supervised mount). Under systemd
the connection is also kept in the unit's file descriptor store, so a restart of the whole
service serves the same mount again.
.SH "SIGNALS"
SIGTERM or SIGINT unmount once open files are closed (a second one detaches at once). SIGUSR2
cycles the log level (default, debug, trace). SIGHUP reopens the log file. SIGUSR1 to the
supervisor of a supervised mount is what \fBs3mount upgrade\fR sends.
.SH "ENVIRONMENT"
.TP
\fBAWS_ACCESS_KEY_ID\fR, \fBAWS_SECRET_ACCESS_KEY\fR, \fBAWS_SESSION_TOKEN\fR, \fBAWS_PROFILE\fR, \fBAWS_REGION\fR
Credentials and region, as for the AWS CLI (also ~/.aws/config and ~/.aws/credentials,
SSO, web identity, container and instance credentials).
.TP
\fBAWS_ENDPOINT_URL\fR
The default of \fB\-\-endpoint\-url\fR.
.TP
\fBAWS_CA_BUNDLE\fR
The default of \fB\-\-ca\-bundle\fR.
.TP
\fBS3MOUNT_LOG\fR
A tracing filter for the log (e.g. \fBs3mount=debug\fR).
.TP
\fBS3MOUNT_STATE_DIR\fR, \fBS3MOUNT_RUNTIME_DIR\fR, \fBS3MOUNT_LOG_DIR\fR
Override where state directories, control sockets and fallback log files go.
.TP
\fBNO_COLOR\fR
No colours in the foreground log.
.SH "EXIT STATUS"
0: the mount is live (or, with \fB\-f\fR, was unmounted cleanly). 1: the mount failed (the
one line on stderr says why). 2: invalid options. \fBs3mount status\fR: 0 healthy, 1 a commit
failed since a mount started, 2 a mount is dead or unreachable.
.SH "FILES"
.TP
\fB/var/lib/s3mount/\fIID\fR (root), \fB~/.local/state/s3mount/\fIID\fR
Each mount's staged changes, spooled bytes and recovered data (\fIID\fR: endpoint, bucket,
prefix and a hash; \fBmount.info\fR names them).
.TP
\fB/run/s3mount/\fIID\fB.sock\fR, \fB$XDG_RUNTIME_DIR/s3mount/\fIID\fB.sock\fR
Control sockets that \fBs3mount status\fR asks.
.TP
\fB/var/log/s3mount/\fIID\fB.log\fR
The log of a background mount where there is no syslog (\fB/dev/log\fR) and no \fB\-\-log\-file\fR.
.TP
\fB/lib/systemd/system/s3mount@.service\fR
A template unit: \fBsystemctl enable \-\-now s3mount@$(systemd\-escape \-\-path /mnt/data)\fR
with the source in \fB/etc/s3mount/mnt\-data.env\fR.
.SH "SEE ALSO"
mount(8), fstab(5), fusermount3(1), umount(8), systemd.mount(5),
/usr/share/doc/s3mount/README.md and docs/ (SEMANTICS, CONFIGURATION, OPERATIONS,
TROUBLESHOOTING).
"#;

/// The whole page.
pub fn render() -> Vec<u8> {
    use clap::CommandFactory;
    let man = clap_mangen::Man::new(s3mount::cli::Cli::command());
    let mut out = Vec::new();
    man.render_title(&mut out).unwrap();
    man.render_name_section(&mut out).unwrap();
    man.render_synopsis_section(&mut out).unwrap();
    man.render_description_section(&mut out).unwrap();
    man.render_options_section(&mut out).unwrap();
    man.render_extra_section(&mut out).unwrap();
    out.extend_from_slice(EXTRA.as_bytes());
    man.render_version_section(&mut out).unwrap();
    out
}
