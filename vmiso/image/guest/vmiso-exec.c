/*
 * vmiso-exec: the last step of the guest wrapper for a task in a container image.
 *
 *   vmiso-exec TASKDIR ROOT PIDFILE UID GID GROUPS HOSTNAME ADDRESS DNS
 *
 * Runs as root in the micro guest, with the image's root file system mounted at ROOT. TASKDIR is
 * the seed's task directory: it reads the task's argv, environment and working directory from
 * there (base64 lines, the wrapper's format) and decodes them itself, because the wrapper's
 * shell pays a fork for every item it decodes. It writes its pid to PIDFILE (the wrapper's stop
 * listener signals that pid; it stays the task's through the exec), then chroots into ROOT, so
 * that every path below is the image's own and a symlink planted by the image resolves inside
 * it, never into vmiso's files; then it adds what a container runtime adds (/proc, /sys
 * read-only, a /dev of its own with pts and shm, a /tmp, /etc/hostname and /etc/hosts), takes
 * the task's user (supplementary GROUPS: comma-separated numbers, or "-" for none), changes to
 * the working directory (created, as root, if missing) and execs the argv with exactly the
 * task's environment (HOSTNAME added when it has none, as docker does; nothing of the wrapper's),
 * finding the command in the task's PATH. ADDRESS is the guest's IPv4 address, or "-";
 * DNS its name servers for /etc/resolv.conf (comma-separated), or "-" to keep the image's file.
 *
 * Exit status when the task cannot be started (as docker's): 126 it could not be set up or
 * executed, 127 the command was not found. Compiled static by vmiso's micro build; nothing here
 * is visible to the task after the chroot.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/types.h>
#include <unistd.h>

#define MAX_GROUPS 64
#define MAX_TASK_FILE (8 << 20)  /* larger than any argv + env the kernel execs */

static void die(int code, const char *what, const char *arg)
{
    fprintf(stderr, "vmiso-exec: %s%s%s: %s\n", what, arg ? " " : "", arg ? arg : "", strerror(errno));
    exit(code);
}

static void fail(const char *message, const char *arg)
{
    fprintf(stderr, "vmiso-exec: %s %s\n", message, arg);
    exit(126);
}

static unsigned long number(const char *text)
{
    char *end;
    errno = 0;
    unsigned long value = strtoul(text, &end, 10);
    if (errno || end == text || *end || value > INT_MAX)
        fail("not a number:", text);
    return value;
}

/* mkdir -p of an absolute path, as root (inside the chroot). */
static void make_dirs(const char *path, mode_t mode)
{
    char buf[PATH_MAX];
    if (strlen(path) >= sizeof buf)
        fail("path too long:", path);
    strcpy(buf, path);
    for (char *p = buf + 1; *p; p++) {
        if (*p != '/')
            continue;
        *p = '\0';
        if (mkdir(buf, mode) && errno != EEXIST)
            die(126, "cannot create", buf);
        *p = '/';
    }
    if (mkdir(buf, mode) && errno != EEXIST)
        die(126, "cannot create", buf);
}

static void mount_at(const char *type, const char *target, unsigned long flags, const char *data, mode_t mode)
{
    make_dirs(target, mode);
    if (mount(type, target, type, flags, data))
        die(126, "cannot mount", target);
}

/* Replace the image's file (never writing through a symlink it may hold) with TEXT. */
static void write_file(const char *path, const char *text)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, 0644);
    if (fd < 0 && errno == ELOOP) {
        if (unlink(path))
            die(126, "cannot replace", path);
        fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0644);
    }
    if (fd < 0)
        die(126, "cannot write", path);
    size_t len = strlen(text);
    if (write(fd, text, len) != (ssize_t)len || close(fd))
        die(126, "cannot write", path);
}

/* /etc/resolv.conf from DNS ("A.B.C.D,..." or "-": the image's own file stays). */
static void resolv_conf(const char *dns)
{
    if (!strcmp(dns, "-"))
        return;
    char text[256] = "", line[40];
    char copy[128];
    if (strlen(dns) >= sizeof copy || strspn(dns, "0123456789.,") != strlen(dns))
        fail("not name server addresses:", dns);
    strcpy(copy, dns);
    for (char *server = strtok(copy, ","); server; server = strtok(NULL, ",")) {
        snprintf(line, sizeof line, "nameserver %s\n", server);
        strncat(text, line, sizeof text - strlen(text) - 1);
    }
    write_file("/etc/resolv.conf", text);
}

/* The task's /dev, as a container runtime makes it: a tmpfs with the devices every program
 * expects, never the VM's devtmpfs, whose disks (the image's root, the seed), serial ports and
 * virtio ports are vmiso's, not the task's. */
static void dev_tree(void)
{
    static const struct { const char *name; unsigned major, minor; } nodes[] = {
        {"null", 1, 3}, {"zero", 1, 5}, {"full", 1, 7}, {"random", 1, 8}, {"urandom", 1, 9}, {"tty", 5, 0},
    };
    static const struct { const char *name, *target; } links[] = {
        {"fd", "/proc/self/fd"}, {"stdin", "/proc/self/fd/0"}, {"stdout", "/proc/self/fd/1"},
        {"stderr", "/proc/self/fd/2"}, {"ptmx", "pts/ptmx"},
    };
    char path[64];
    mount_at("tmpfs", "/dev", MS_NOSUID, "mode=0755,size=65536k", 0755);
    for (size_t i = 0; i < sizeof nodes / sizeof *nodes; i++) {
        snprintf(path, sizeof path, "/dev/%s", nodes[i].name);
        /* chmod, not the mode argument: the wrapper's umask would take the others' write bit */
        if (mknod(path, S_IFCHR | 0600, makedev(nodes[i].major, nodes[i].minor)) || chmod(path, 0666))
            die(126, "cannot create", path);
    }
    for (size_t i = 0; i < sizeof links / sizeof *links; i++) {
        snprintf(path, sizeof path, "/dev/%s", links[i].name);
        if (symlink(links[i].target, path))
            die(126, "cannot create", path);
    }
}

static void runtime_files(const char *hostname, const char *address, const char *dns)
{
    const unsigned long nodev = MS_NOSUID | MS_NODEV, noexec = MS_NOSUID | MS_NODEV | MS_NOEXEC;
    mount_at("proc", "/proc", noexec, NULL, 0555);
    mount_at("sysfs", "/sys", noexec | MS_RDONLY, NULL, 0555);
    dev_tree();
    mount_at("devpts", "/dev/pts", MS_NOSUID | MS_NOEXEC, "newinstance,mode=0620,ptmxmode=0666", 0755);
    mount_at("tmpfs", "/dev/shm", nodev, "mode=1777", 01777);
    mount_at("tmpfs", "/tmp", nodev, "mode=1777", 01777);
    make_dirs("/etc", 0755);
    char text[512];
    snprintf(text, sizeof text, "%s\n", hostname);
    write_file("/etc/hostname", text);
    snprintf(text, sizeof text, "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n%s\t%s\n",
             strcmp(address, "-") ? address : "127.0.1.1", hostname);
    write_file("/etc/hosts", text);
    resolv_conf(dns);
}

static void take_user(const char *uid_text, const char *gid_text, char *groups_text)
{
    gid_t groups[MAX_GROUPS];
    size_t count = 0;
    if (strcmp(groups_text, "-"))
        for (char *item = strtok(groups_text, ","); item; item = strtok(NULL, ",")) {
            if (count == MAX_GROUPS)
                fail("too many groups:", groups_text);
            groups[count++] = (gid_t)number(item);
        }
    if (setgroups(count, groups))
        die(126, "cannot set the groups", groups_text);
    if (setgid((gid_t)number(gid_text)))
        die(126, "cannot set the group", gid_text);
    if (setuid((uid_t)number(uid_text)))
        die(126, "cannot set the user", uid_text);
}

/* The bytes of TASKDIR/NAME (NUL-terminated; an empty string when it is absent). */
static char *read_task_file(const char *dir, const char *name)
{
    char path[PATH_MAX];
    if (snprintf(path, sizeof path, "%s/%s", dir, name) >= (int)sizeof path)
        fail("path too long:", dir);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0 && errno == ENOENT)
        return calloc(1, 1);
    struct stat st;
    if (fd < 0 || fstat(fd, &st))
        die(126, "cannot read", path);
    if (st.st_size > MAX_TASK_FILE)
        fail("too large:", path);
    char *text = malloc(st.st_size + 1);
    size_t got = 0;
    while (text && got < (size_t)st.st_size) {
        ssize_t n = read(fd, text + got, st.st_size - got);
        if (n <= 0)
            die(126, "cannot read", path);
        got += n;
    }
    if (!text)
        fail("out of memory reading", path);
    text[got] = '\0';
    close(fd);
    return text;
}

static int b64_value(int c)
{
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    if (c == '+') return 62;
    if (c == '/') return 63;
    return -1;
}

/* Decode one base64 line in place (padded, as Python's b64encode writes it); NULL if it is not
 * base64 or the result holds a NUL (not an argument, a variable or a path). */
static char *b64_decode(char *line)
{
    size_t len = strlen(line), out = 0;
    if (len % 4)
        return NULL;
    for (size_t i = 0; i < len; i += 4) {
        int v[4], pad = 0;
        for (int k = 0; k < 4; k++) {
            if (line[i + k] == '=' && i + 4 == len && k >= 2 && (k == 3 || line[i + 3] == '=')) {
                v[k] = 0;
                pad++;
            } else if ((v[k] = b64_value((unsigned char)line[i + k])) < 0) {
                return NULL;
            }
        }
        unsigned bits = (unsigned)v[0] << 18 | (unsigned)v[1] << 12 | (unsigned)v[2] << 6 | (unsigned)v[3];
        char bytes[3] = {(char)(bits >> 16), (char)(bits >> 8), (char)bits};
        for (int k = 0; k < 3 - pad; k++) {
            if (!bytes[k])
                return NULL;
            line[out++] = bytes[k];
        }
    }
    line[out] = '\0';
    return line;
}

/* The decoded lines of TASKDIR/NAME as a NULL-terminated array, plus room for EXTRA more. */
static char **read_task_list(const char *dir, const char *name, size_t extra)
{
    char *text = read_task_file(dir, name);
    size_t count = 0;
    for (char *p = text; *p; p++)
        count += *p == '\n';
    char **items = calloc(count + 2 + extra, sizeof *items);
    if (!items)
        fail("out of memory reading", name);
    size_t n = 0;
    for (char *line = text, *end; (end = strchr(line, '\n')); line = end + 1) {
        *end = '\0';  /* an empty line is an empty item (an argument may be "") */
        if (!(items[n++] = b64_decode(line)))
            fail("not base64 data in the task's", name);
    }
    return items;
}

static void write_pid(const char *pidfile)
{
    /* Best effort, as before: without it the task runs, only without a graceful stop. */
    int fd = open(pidfile, O_WRONLY | O_TRUNC | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0)
        return;
    char text[32];
    int len = snprintf(text, sizeof text, "%d\n", (int)getpid());
    (void)!write(fd, text, len);
    close(fd);
}

int main(int argc, char **argv)
{
    if (argc != 10)
        fail("usage:", "TASKDIR ROOT PIDFILE UID GID GROUPS HOSTNAME ADDRESS DNS");
    const char *taskdir = argv[1], *root = argv[2], *hostname = argv[7];
    char **task_argv = read_task_list(taskdir, "argv", 0);
    char **task_env = read_task_list(taskdir, "env", 1);
    char *workdir = read_task_file(taskdir, "workdir");
    workdir[strcspn(workdir, "\n")] = '\0';
    if (!*workdir)
        workdir = "/";
    else if (!b64_decode(workdir))
        fail("not base64 data in the task's", "workdir");
    if (!task_argv[0])
        fail("no command:", "the task's argv is empty");
    size_t n_env = 0;
    int has_hostname = 0;
    for (; task_env[n_env]; n_env++)
        has_hostname |= !strncmp(task_env[n_env], "HOSTNAME=", 9);
    if (!has_hostname) {
        size_t size = strlen(hostname) + 10;
        char *item = malloc(size);
        if (!item)
            fail("out of memory for", "HOSTNAME");
        snprintf(item, size, "HOSTNAME=%s", hostname);
        task_env[n_env] = item;
    }
    write_pid(argv[3]);
    if (chroot(root) || chdir("/"))
        die(126, "cannot enter the image's root", root);
    runtime_files(hostname, argv[8], argv[9]);
    if (workdir[0] != '/')
        fail("the working directory is not absolute:", workdir);
    make_dirs(workdir, 0755);
    take_user(argv[4], argv[5], argv[6]);
    if (chdir(workdir))
        die(126, "cannot change to the working directory", workdir);
    environ = task_env;  /* execvp looks the command up in the task's PATH */
    execvp(task_argv[0], task_argv);
    if (errno == ENOENT)
        fprintf(stderr, "vmiso-exec: %s: executable file not found in $PATH\n", task_argv[0]);
    else
        fprintf(stderr, "vmiso-exec: cannot execute %s: %s\n", task_argv[0], strerror(errno));
    return errno == ENOENT ? 127 : 126;
}
