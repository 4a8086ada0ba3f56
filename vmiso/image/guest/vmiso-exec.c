/*
 * vmiso-exec: the last step of the guest wrapper for a task in a container image.
 *
 *   vmiso-exec ROOT UID GID GROUPS WORKDIR HOSTNAME ADDRESS -- ARGV...
 *
 * Runs as root in the micro guest, with the task's environment already exported and the image's
 * root file system mounted at ROOT. It chroots into ROOT first, so that every path below is the
 * image's own and a symlink planted by the image resolves inside it, never into vmiso's files;
 * then it adds what a container runtime adds (/proc, /sys read-only, /dev with pts and shm, a
 * /tmp, /etc/hostname and /etc/hosts), takes the task's user (supplementary GROUPS: comma-
 * separated numbers, or "-" for none), changes to WORKDIR (created, as root, if missing) and
 * execs ARGV with the task's PATH. ADDRESS is the guest's IPv4 address, or "-".
 *
 * Exit status when the task cannot be started (as docker's): 126 it could not be set up or
 * executed, 127 the command was not found. The process keeps its pid through every exec, so
 * the wrapper's stop request reaches the task. Compiled static by vmiso's micro build; nothing
 * here is visible to the task after the chroot.
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
#include <sys/types.h>
#include <unistd.h>

#define MAX_GROUPS 64

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

static void runtime_files(const char *hostname, const char *address)
{
    const unsigned long nodev = MS_NOSUID | MS_NODEV, noexec = MS_NOSUID | MS_NODEV | MS_NOEXEC;
    mount_at("proc", "/proc", noexec, NULL, 0555);
    mount_at("sysfs", "/sys", noexec | MS_RDONLY, NULL, 0555);
    mount_at("devtmpfs", "/dev", MS_NOSUID, "mode=0755", 0755);
    mount_at("devpts", "/dev/pts", MS_NOSUID | MS_NOEXEC, "mode=0620,ptmxmode=0666", 0755);
    mount_at("tmpfs", "/dev/shm", nodev, "mode=1777", 01777);
    mount_at("tmpfs", "/tmp", nodev, "mode=1777", 01777);
    make_dirs("/etc", 0755);
    char text[512];
    snprintf(text, sizeof text, "%s\n", hostname);
    write_file("/etc/hostname", text);
    snprintf(text, sizeof text, "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n%s\t%s\n",
             strcmp(address, "-") ? address : "127.0.1.1", hostname);
    write_file("/etc/hosts", text);
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

int main(int argc, char **argv)
{
    if (argc < 10 || strcmp(argv[8], "--"))
        fail("usage:", "ROOT UID GID GROUPS WORKDIR HOSTNAME ADDRESS -- ARGV...");
    const char *root = argv[1], *workdir = argv[5];
    if (chroot(root) || chdir("/"))
        die(126, "cannot enter the image's root", root);
    runtime_files(argv[6], argv[7]);
    if (workdir[0] != '/')
        fail("the working directory is not absolute:", workdir);
    make_dirs(workdir, 0755);
    take_user(argv[2], argv[3], argv[4]);
    if (chdir(workdir))
        die(126, "cannot change to the working directory", workdir);
    execvp(argv[9], argv + 9);
    if (errno == ENOENT)
        fprintf(stderr, "vmiso-exec: %s: executable file not found in $PATH\n", argv[9]);
    else
        fprintf(stderr, "vmiso-exec: cannot execute %s: %s\n", argv[9], strerror(errno));
    return errno == ENOENT ? 127 : 126;
}
