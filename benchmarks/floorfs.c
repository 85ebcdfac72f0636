/* The floor of a FUSE round trip here: a do-nothing filesystem in C on libfuse's low-level API.
 *
 * One regular file, "f" (inode 2), in the root. Every request is answered at once from
 * constants: lookup and getattr give fixed attributes (300 s timeouts, as zfs_ram), open keeps
 * the page cache, write accepts everything, read returns zeros; everything else (getxattr,
 * flush, fsync, ...) is libfuse's ENOSYS, which the kernel remembers. What a workload
 * costs on it is the kernel's FUSE and libfuse's single-threaded loop, nothing else:
 * benchmarks/request_floor.py sets pyfuse3 (nullfs.py) and zfs_ram against it.
 *
 * With FLOORFS_SPIN_NS=N in the environment it serves from its own loop instead of
 * fuse_session_loop: /dev/fuse non-blocking, and after each request it keeps reading for up to
 * N ns before it sleeps in poll(), so that its vCPU does not halt between a client's requests
 * (the experiment behind issue 13's next step; benchmarks/README.md has the figures).
 *
 * Build: gcc -O2 -o floorfs floorfs.c $(pkg-config --cflags --libs fuse3)
 * Run:   ./floorfs MOUNTPOINT   (foreground; fusermount3 -u MOUNTPOINT ends it)
 */
#define FUSE_USE_VERSION 34
#include <fuse_lowlevel.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <time.h>
#include <sys/stat.h>

#define FILE_INO 2
static const double TIMEOUT = 300.0;
static char zeros[1 << 20];
static off_t file_size;

static void fill(fuse_ino_t ino, struct stat *st) {
    memset(st, 0, sizeof(*st));
    st->st_ino = ino;
    if (ino == FUSE_ROOT_ID) {
        st->st_mode = S_IFDIR | 0777;
        st->st_nlink = 2;
    } else {
        st->st_mode = S_IFREG | 0666;
        st->st_nlink = 1;
        st->st_size = file_size;
    }
}

static void op_lookup(fuse_req_t req, fuse_ino_t parent, const char *name) {
    struct fuse_entry_param e;
    if (parent != FUSE_ROOT_ID || strcmp(name, "f") != 0) {
        memset(&e, 0, sizeof(e));
        e.entry_timeout = TIMEOUT; /* a cached negative entry */
        fuse_reply_entry(req, &e);
        return;
    }
    memset(&e, 0, sizeof(e));
    e.ino = FILE_INO;
    e.attr_timeout = TIMEOUT;
    e.entry_timeout = TIMEOUT;
    fill(FILE_INO, &e.attr);
    fuse_reply_entry(req, &e);
}

static void op_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
    (void)fi;
    struct stat st;
    fill(ino, &st);
    fuse_reply_attr(req, &st, TIMEOUT);
}

static void op_setattr(fuse_req_t req, fuse_ino_t ino, struct stat *attr, int to_set,
                       struct fuse_file_info *fi) {
    (void)fi;
    if (to_set & FUSE_SET_ATTR_SIZE)
        file_size = attr->st_size;
    struct stat st;
    fill(ino, &st);
    fuse_reply_attr(req, &st, TIMEOUT);
}

static void op_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
    (void)ino;
    fi->keep_cache = 1;
    fuse_reply_open(req, fi);
}

static void op_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                    struct fuse_file_info *fi) {
    (void)ino, (void)fi;
    size_t n = off >= file_size ? 0 : (size_t)(file_size - off) < size ? (size_t)(file_size - off) : size;
    fuse_reply_buf(req, zeros, n < sizeof(zeros) ? n : sizeof(zeros));
}

static void op_write(fuse_req_t req, fuse_ino_t ino, const char *buf, size_t size, off_t off,
                     struct fuse_file_info *fi) {
    (void)ino, (void)buf, (void)fi;
    if (off + (off_t)size > file_size)
        file_size = off + (off_t)size;
    fuse_reply_write(req, size);
}

static void op_release(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
    (void)ino, (void)fi;
    fuse_reply_err(req, 0);
}

static long elapsed_ns(const struct timespec *since) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (now.tv_sec - since->tv_sec) * 1000000000L + (now.tv_nsec - since->tv_nsec);
}

/* fuse_session_loop, but spinning for up to spin_ns after each request before it sleeps. */
static int spinning_loop(struct fuse_session *se, long spin_ns) {
    int fd = fuse_session_fd(se);
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    struct fuse_buf buf = {0};
    struct timespec last;
    clock_gettime(CLOCK_MONOTONIC, &last);
    int ret = 0;
    while (!fuse_session_exited(se)) {
        int res = fuse_session_receive_buf(se, &buf);
        if (res == -EAGAIN || res == -EINTR) {
            if (elapsed_ns(&last) >= spin_ns) {
                struct pollfd p = {fd, POLLIN, 0};
                poll(&p, 1, -1);
            }
            continue;
        }
        if (res <= 0) {
            ret = res;
            break;
        }
        fuse_session_process_buf(se, &buf);
        clock_gettime(CLOCK_MONOTONIC, &last);
    }
    free(buf.mem);
    return ret == -ENODEV ? 0 : ret; /* ENODEV: unmounted */
}

static const struct fuse_lowlevel_ops ops = {
    .lookup = op_lookup,
    .getattr = op_getattr,
    .setattr = op_setattr,
    .open = op_open,
    .read = op_read,
    .write = op_write,
    .release = op_release,
};

int main(int argc, char *argv[]) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s MOUNTPOINT\n", argv[0]);
        return 2;
    }
    char *fuse_argv[] = {argv[0], "-o", "default_permissions,subtype=floorfs", NULL};
    struct fuse_args args = FUSE_ARGS_INIT(3, fuse_argv);
    struct fuse_session *se = fuse_session_new(&args, &ops, sizeof(ops), NULL);
    if (se == NULL)
        return 1;
    if (fuse_session_mount(se, argv[1]) != 0) {
        fuse_session_destroy(se);
        return 1;
    }
    const char *spin = getenv("FLOORFS_SPIN_NS");
    int ret = spin ? spinning_loop(se, atol(spin)) : fuse_session_loop(se);
    fuse_session_unmount(se);
    fuse_session_destroy(se);
    return ret ? 1 : 0;
}
