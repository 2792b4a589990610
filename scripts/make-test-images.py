#!/usr/bin/env python3
"""Builds the OCI image layouts the tests boot, without docker.

Images (each its own OCI layout directory, tag `latest`):
  busybox  - one gzip layer: Debian's busybox-static with its applets, /etc/passwd and
             /etc/group (root, app:1000), Cmd ["/bin/sh"].
  layered  - the same base layer, then a zstd layer and an uncompressed layer that exercise
             overlay semantics: a whiteout, an opaque directory, a hard link, a symlink;
             Entrypoint, Cmd, Env, WorkingDir and User are set.
  multiarch - a nested image index: an arm64 decoy and the amd64 busybox image.
  redis    - the busybox base layer, then a gzip layer with Debian's redis server
             (redis-tools' /usr/bin/redis-check-rdb, which is redis-server: redis picks its
             mode from argv[0]) at /usr/bin/redis-server, plus its whole shared-library
             closure per ldd (real files at their real paths, symlink names recreated) and
             an empty /data; Cmd runs redis-server on 0.0.0.0:6379 without persistence or
             protected mode, WorkingDir /data.
  openssl  - the busybox base layer, then a gzip layer with Debian's /usr/bin/openssl, its
             shared-library closure per ldd (as for redis) and the OpenSSL config
             (/usr/lib/ssl/openssl.cnf, a symlink to the real /etc/ssl/openssl.cnf, as on the
             host); Cmd makes a self-signed certificate for CN guest.test at boot, then runs
             `openssl s_server -www` (TLS on port 443; `GET /` gets an HTML status page),
             WorkingDir /tmp.
  websocket - the busybox base layer, then Debian's websocketd (and its libc closure) at
             /usr/bin/websocketd; Cmd `websocketd --port=80 cat`: a WebSocket echo, one
             message per line.
  sqlite   - the busybox base layer, then Debian's sqlite3 shell and its library closure at
             /usr/bin/sqlite3; Cmd /bin/sh (databases on volumes).

Output is cached under ~/.cache/supermachine/test-images/<hash of this script, busybox, the
bundled binaries (redis, openssl, websocketd, sqlite3), their libraries and the OpenSSL config>/ and reproducible (fixed
mtimes, sorted entries, gzip without timestamps). Prints the directory holding the layouts.
"""
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile

BUSYBOX = "/bin/busybox"
# Debian's redis-tools ships the server binary under this name (the redis-server package
# only adds a symlink to it); run as "redis-server" it is the server.
REDIS = "/usr/bin/redis-check-rdb"
OPENSSL = "/usr/bin/openssl"
SQLITE3 = "/usr/bin/sqlite3"
WEBSOCKETD = "/usr/bin/websocketd"
# A symlink to /etc/ssl/openssl.cnf on Debian; both are recreated in the image.
OPENSSL_CNF = "/usr/lib/ssl/openssl.cnf"
MTIME = 1700000000
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def cache_root():
    if os.environ.get("SUPERMACHINE_CACHE"):
        return os.environ["SUPERMACHINE_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "supermachine")


def ensure_package(pkg, path):
    installed = subprocess.run(["dpkg", "-s", pkg], capture_output=True).returncode == 0
    if installed and os.path.exists(path):
        return
    print(f"test-images: installing {pkg}", file=sys.stderr)
    subprocess.run(["apt-get", "install", "-y", "-q", pkg], check=True,
                   stdout=sys.stderr, env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))


def ensure_busybox():
    ensure_package("busybox-static", BUSYBOX)


# Images that are the base layer plus one "binary + ldd closure" layer:
# name -> (Debian package, host binary, path in the image, extra host files, empty dirs).
BUNDLES = {
    "openssl": ("openssl", OPENSSL, "usr/bin/openssl", (OPENSSL_CNF,), ()),
    "redis": ("redis-tools", REDIS, "usr/bin/redis-server", (), ("data",)),
    "websocket": ("websocketd", WEBSOCKETD, "usr/bin/websocketd", (), ()),
    "sqlite": ("sqlite3", SQLITE3, "usr/bin/sqlite3", (), ()),
}


def resolve(path, links, depth=0):
    """Resolves absolute `path` one component at a time; records each symlink met on the way
    (its path -> its link text) in `links` and returns the real path."""
    if depth > 40:
        raise RuntimeError(f"test-images: too many symlinks resolving {path}")
    cur = "/"
    parts = [p for p in path.split("/") if p and p != "."]
    for i, comp in enumerate(parts):
        if comp == "..":
            cur = os.path.dirname(cur)  # cur is always a real directory
            continue
        nxt = os.path.join(cur, comp)
        if os.path.islink(nxt):
            target = os.readlink(nxt)
            links[nxt] = target
            base = target if target.startswith("/") else os.path.join(cur, target)
            return resolve("/".join([base] + parts[i + 1:]), links, depth + 1)
        cur = nxt
    return cur


def closure(binary, extras=()):
    """`binary`'s shared-library closure per ldd, the dynamic loader included, plus the
    absolute host paths `extras`: (sorted real files, {symlink path: link text}) with every
    symlink met on the way to each file."""
    libs = []
    for line in subprocess.run(["ldd", binary], check=True, capture_output=True, text=True).stdout.splitlines():
        line = line.strip()
        if "not found" in line:
            raise RuntimeError(f"test-images: {binary}: unresolved library: {line}")
        if "=>" in line:
            target = line.split("=>", 1)[1].split()
            if target and target[0].startswith("/"):
                libs.append(target[0])
        elif line.startswith("/"):
            libs.append(line.split()[0])  # the dynamic loader
    if not any(os.path.basename(l).startswith("ld-linux") for l in libs):
        raise RuntimeError(f"test-images: ldd {binary} named no dynamic loader")
    files, links = set(), {}
    for path in libs + list(extras):
        real = resolve(path, links)
        if not os.path.isfile(real):
            raise RuntimeError(f"test-images: {path} resolves to {real}, not a file")
        files.add(real)
    return sorted(files), dict(sorted(links.items()))


class Layer:
    """An in-memory tar layer with deterministic metadata."""

    def __init__(self):
        self.buf = io.BytesIO()
        self.tar = tarfile.open(fileobj=self.buf, mode="w", format=tarfile.PAX_FORMAT)

    def _info(self, name, kind, mode, uid=0, gid=0):
        ti = tarfile.TarInfo(name)
        ti.type = kind
        ti.mode = mode
        ti.uid, ti.gid = uid, gid
        ti.uname = ti.gname = ""
        ti.mtime = MTIME
        return ti

    def dir(self, name, mode=0o755, uid=0, gid=0):
        self.tar.addfile(self._info(name, tarfile.DIRTYPE, mode, uid, gid))

    def file(self, name, data, mode=0o644, uid=0, gid=0):
        if isinstance(data, str):
            data = data.encode()
        ti = self._info(name, tarfile.REGTYPE, mode, uid, gid)
        ti.size = len(data)
        self.tar.addfile(ti, io.BytesIO(data))

    def symlink(self, name, target):
        ti = self._info(name, tarfile.SYMTYPE, 0o777)
        ti.linkname = target
        self.tar.addfile(ti)

    def hardlink(self, name, target):
        ti = self._info(name, tarfile.LNKTYPE, 0o644)
        ti.linkname = target
        self.tar.addfile(ti)

    def bytes(self):
        self.tar.close()
        return self.buf.getvalue()


def base_layer():
    l = Layer()
    for d in ["bin", "sbin", "usr", "usr/bin", "usr/sbin", "etc", "root", "tmp", "home", "home/app", "var", "var/www"]:
        mode = 0o1777 if d == "tmp" else 0o700 if d == "root" else 0o755
        uid = 1000 if d == "home/app" else 0
        l.dir(d, mode, uid, uid)
    l.file("bin/busybox", open(BUSYBOX, "rb").read(), 0o755)
    applets = subprocess.run([BUSYBOX, "--list-full"], check=True, capture_output=True, text=True).stdout.split()
    for path in sorted(set(applets)):
        if path == "bin/busybox":
            continue
        l.symlink(path, "../" * path.count("/") + "bin/busybox")
    l.file("etc/passwd", "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n")
    l.file("etc/group", "root:x:0:\napp:x:1000:\nstaff:x:50:app\n")
    l.file("var/www/index.html", "<h1>hello from supermachine</h1>\n")
    # CGI endpoints for busybox httpd: echo the request body; write/read a marker file.
    l.dir("var/www/cgi-bin")
    # (the body is read in full before the response starts)
    l.file(
        "var/www/cgi-bin/echo",
        "#!/bin/sh\nhead -c \"$CONTENT_LENGTH\" > /tmp/body.$$\n"
        "printf 'Content-Type: application/octet-stream\\r\\n\\r\\n'\ncat /tmp/body.$$\nrm -f /tmp/body.$$\n",
        0o755,
    )
    l.file(
        "var/www/cgi-bin/mark",
        "#!/bin/sh\nprintf 'Content-Type: text/plain\\r\\n\\r\\n'\n"
        "if [ -n \"$QUERY_STRING\" ]; then echo \"$QUERY_STRING\" > /tmp/mark; fi\n"
        "cat /tmp/mark 2>/dev/null || echo none\n",
        0o755,
    )
    return l.bytes()


def binary_layer(binary, name, closure, dirs=()):
    """A layer with host `binary` at `name` (mode 0755), the real files and symlinks of
    `closure` at their host paths, empty directories `dirs`, and every parent directory."""
    files, links = closure
    entries = {name: ("file", binary, 0o755)}
    for d in dirs:
        entries[d] = ("dir",)
    for f in files:
        entries[f.lstrip("/")] = ("file", f, os.stat(f).st_mode & 0o7777)
    for path, target in links.items():
        entries[path.lstrip("/")] = ("symlink", target)
    for name in list(entries):
        parent = os.path.dirname(name)
        while parent:
            entries.setdefault(parent, ("dir",))
            parent = os.path.dirname(parent)
    l = Layer()
    for name in sorted(entries):  # a parent sorts before its children
        e = entries[name]
        if e[0] == "dir":
            l.dir(name)
        elif e[0] == "file":
            with open(e[1], "rb") as f:
                l.file(name, f.read(), e[2])
        else:
            l.symlink(name, e[1])
    return l.bytes()


def overlay_layers():
    # Layer 2: things the next layer hides or replaces.
    l2 = Layer()
    l2.dir("data")
    l2.file("data/gone.txt", "you should not see me\n")
    l2.file("data/keep.txt", "kept\n")
    l2.dir("opq")
    l2.file("opq/old1", "old\n")
    l2.file("opq/old2", "old\n")
    # Layer 3: the whiteout, the opaque marker, links, the workdir.
    l3 = Layer()
    l3.dir("data")
    l3.file("data/.wh.gone.txt", "")
    l3.dir("opq")
    l3.file("opq/.wh..wh..opq", "")
    l3.file("opq/new1", "new\n")
    l3.dir("links")
    l3.file("links/target.txt", "linked content\n")
    l3.hardlink("links/hard.txt", "links/target.txt")
    l3.symlink("links/sym.txt", "target.txt")
    l3.dir("app", 0o755, 1000, 1000)
    l3.file("app/suid", "#!/bin/sh\necho suid\n", 0o4755)
    return l2.bytes(), l3.bytes()


class Layout:
    def __init__(self, root):
        self.root = root
        os.makedirs(os.path.join(root, "blobs", "sha256"))
        with open(os.path.join(root, "oci-layout"), "w") as f:
            json.dump({"imageLayoutVersion": "1.0.0"}, f)

    def blob(self, data, media_type):
        d = hashlib.sha256(data).hexdigest()
        with open(os.path.join(self.root, "blobs", "sha256", d), "wb") as f:
            f.write(data)
        return {"mediaType": media_type, "digest": "sha256:" + d, "size": len(data)}

    def manifest(self, tar_layers, config, arch="amd64"):
        """Writes config + layers + manifest; returns the manifest's descriptor."""
        descs, diff_ids = [], []
        for raw, comp in tar_layers:
            diff_ids.append("sha256:" + hashlib.sha256(raw).hexdigest())
            if comp == "gzip":
                data = gzip.compress(raw, mtime=0)
                mt = "application/vnd.oci.image.layer.v1.tar+gzip"
            elif comp == "zstd":
                data = subprocess.run(["zstd", "-q", "-c", "-3"], input=raw, check=True, capture_output=True).stdout
                mt = "application/vnd.oci.image.layer.v1.tar+zstd"
            else:
                data, mt = raw, "application/vnd.oci.image.layer.v1.tar"
            descs.append(self.blob(data, mt))
        cfg = {
            "architecture": arch,
            "os": "linux",
            "config": config,
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": [{"created_by": "make-test-images.py"} for _ in tar_layers],
        }
        cfg_desc = self.blob(json.dumps(cfg, sort_keys=True).encode(), "application/vnd.oci.image.config.v1+json")
        manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "config": cfg_desc, "layers": descs}
        return self.blob(json.dumps(manifest, sort_keys=True).encode(), "application/vnd.oci.image.manifest.v1+json")

    def tag(self, desc, tag):
        desc = dict(desc, annotations={"org.opencontainers.image.ref.name": tag})
        index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [desc]}
        with open(os.path.join(self.root, "index.json"), "w") as f:
            json.dump(index, f, sort_keys=True)

    def image(self, tar_layers, config, tag="latest"):
        self.tag(self.manifest(tar_layers, config), tag)

    def multiarch(self, per_arch, tag="latest"):
        """A nested image index: one manifest per (arch, layers, config)."""
        manifests = []
        for arch, layers, config in per_arch:
            d = self.manifest(layers, config, arch)
            d["platform"] = {"architecture": arch, "os": "linux"}
            manifests.append(d)
        nested = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": manifests}
        self.tag(self.blob(json.dumps(nested, sort_keys=True).encode(), "application/vnd.oci.image.index.v1+json"), tag)


def bundle_layer(image, closures):
    _, binary, name, _, dirs = BUNDLES[image]
    return binary_layer(binary, name, closures[image], dirs)


def build(out, closures):
    base = base_layer()
    Layout(os.path.join(out, "busybox")).image([(base, "gzip")], {"Env": [PATH_ENV], "Cmd": ["/bin/sh"]})
    # A multi-arch index whose arm64 entry is a decoy: only amd64 can run here.
    decoy = Layer()
    decoy.file("ARCH", "arm64\n")
    Layout(os.path.join(out, "multiarch")).multiarch(
        [
            ("arm64", [(decoy.bytes(), "gzip")], {"Env": [PATH_ENV, "ARCH=arm64"], "Cmd": ["/bin/sh"]}),
            ("amd64", [(base, "gzip")], {"Env": [PATH_ENV, "ARCH=amd64"], "Cmd": ["/bin/sh"]}),
        ]
    )
    l2, l3 = overlay_layers()
    Layout(os.path.join(out, "layered")).image(
        [(base, "gzip"), (l2, "zstd"), (l3, "none")],
        {
            "Env": [PATH_ENV, "GREETING=hello from the image", "SHARED=image"],
            "Entrypoint": ["/bin/echo", "entry"],
            "Cmd": ["default-cmd"],
            "WorkingDir": "/app",
            "User": "app",
        },
    )
    Layout(os.path.join(out, "redis")).image(
        [(base, "gzip"), (bundle_layer("redis", closures), "gzip")],
        {
            "Env": [PATH_ENV],
            "Cmd": ["redis-server", "--protected-mode", "no", "--save", "", "--appendonly", "no",
                    "--bind", "0.0.0.0"],
            "WorkingDir": "/data",
        },
    )
    Layout(os.path.join(out, "openssl")).image(
        [(base, "gzip"), (bundle_layer("openssl", closures), "gzip")],
        {
            "Env": [PATH_ENV],
            "Cmd": ["/bin/sh", "-c",
                    "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes"
                    " -keyout /tmp/key.pem -out /tmp/cert.pem -subj /CN=guest.test"
                    " -addext subjectAltName=DNS:guest.test -days 2 2>/dev/null"
                    " && exec openssl s_server -accept 443 -cert /tmp/cert.pem -key /tmp/key.pem"
                    " -www -quiet"],
            "WorkingDir": "/tmp",
        },
    )
    # A WebSocket echo: websocketd runs `cat` per connection, one message per line.
    Layout(os.path.join(out, "websocket")).image(
        [(base, "gzip"), (bundle_layer("websocket", closures), "gzip")],
        {"Env": [PATH_ENV], "Cmd": ["websocketd", "--port=80", "cat"], "WorkingDir": "/tmp"},
    )
    # Debian's sqlite3 shell (a dynamic binary and its libraries), for databases on volumes.
    Layout(os.path.join(out, "sqlite")).image(
        [(base, "gzip"), (bundle_layer("sqlite", closures), "gzip")],
        {"Env": [PATH_ENV], "Cmd": ["/bin/sh"], "WorkingDir": "/tmp"},
    )


def main():
    ensure_busybox()
    for pkg, binary, _, _, _ in BUNDLES.values():
        ensure_package(pkg, binary)
    closures = {img: closure(b[1], b[3]) for img, b in BUNDLES.items()}
    h = hashlib.sha256()
    h.update(open(__file__, "rb").read())
    h.update(open(BUSYBOX, "rb").read())
    for img in sorted(BUNDLES):
        binary = BUNDLES[img][1]
        h.update(img.encode() + b"\0" + binary.encode() + b"\0")
        h.update(open(binary, "rb").read())
        files, links = closures[img]
        for f in files:
            h.update(f.encode() + b"\0")
            h.update(open(f, "rb").read())
        h.update(json.dumps(links, sort_keys=True).encode())
    out = os.path.join(cache_root(), "test-images", h.hexdigest()[:16])
    if not all(os.path.exists(os.path.join(out, img, "index.json")) for img in ("layered", "redis", "openssl", "websocket", "sqlite")):
        os.makedirs(os.path.dirname(out), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".build-", dir=os.path.dirname(out))
        try:
            build(tmp, closures)
            shutil.rmtree(out, ignore_errors=True)
            os.rename(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    print(out)


if __name__ == "__main__":
    main()
