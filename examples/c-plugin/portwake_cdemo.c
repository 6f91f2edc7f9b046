/*
 * cdemo: a third-party portwake activation plugin written in C against
 * plugin-api/include/portwake_plugin.h alone.
 *
 * It does what the built-in `exec` plugin does, the way systemd-socket-activate
 * does it: runs a command with the unit's listeners at fd 3, 4, ... and the
 * LISTEN_FDS / LISTEN_PID / LISTEN_FDNAMES variables, reports the guest's exit
 * from a thread of its own (exactly once per started guest), and stops it with
 * SIGTERM, then SIGKILL after the stop timeout.
 *
 * Options (RON):  (command: ["/absolute/program", "arg", ...])
 *
 * Build:  cc -std=c11 -shared -fPIC -pthread -I plugin-api/include \
 *            -o libportwake_cdemo.so examples/c-plugin/portwake_cdemo.c
 * Use:    plugin: "/absolute/path/libportwake_cdemo.so"
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "portwake_plugin.h"

extern char **environ;

#ifndef CLOSE_RANGE_CLOEXEC
#define CLOSE_RANGE_CLOEXEC (1U << 2)
#endif

/* ---- instance and guests ---------------------------------------------- */

struct guest {
    uint64_t id;
    pid_t pid;
    struct guest *next;
};

struct instance {
    PwHostV1 host;          /* a copy: the host's table stays valid anyway */
    char **argv;            /* NULL-terminated, owned */
    pthread_mutex_t lock;
    pthread_cond_t changed; /* a guest left the list */
    struct guest *guests;   /* running guests, protected by lock */
    int refs;               /* 1 for the host until destroy, 1 per reaper thread */
};

struct reaper {
    struct instance *inst;
    uint64_t id;
    pid_t pid;
};

static void release(struct instance *inst) {
    pthread_mutex_lock(&inst->lock);
    int left = --inst->refs;
    pthread_mutex_unlock(&inst->lock);
    if (left > 0)
        return;
    for (char **a = inst->argv; a && *a; a++)
        free(*a);
    free(inst->argv);
    pthread_mutex_destroy(&inst->lock);
    pthread_cond_destroy(&inst->changed);
    free(inst);
}

static void host_log(const struct instance *inst, uint32_t level, const char *fmt, ...) {
    char text[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(text, sizeof text, fmt, ap);
    va_end(ap);
    if (n < 0 || !inst->host.log)
        return;
    PwStr message = {text, (size_t)n < sizeof text ? (size_t)n : sizeof text - 1};
    inst->host.log(inst->host.ctx, level, message);
}

static int32_t fail(PwErrorBuf *error, int32_t status, const char *fmt, ...) {
    if (!error || !error->ptr)
        return status;
    char text[1024];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(text, sizeof text, fmt, ap);
    va_end(ap);
    if (n < 0)
        return status;
    size_t len = (size_t)n < sizeof text ? (size_t)n : sizeof text - 1;
    if (len > error->cap)
        len = error->cap;
    memcpy(error->ptr, text, len);
    error->len = len;
    return status;
}

/* ---- options: (command: ["/prog", "arg"]) ------------------------------ */

struct parser {
    const char *p, *end;
};

static void skip_space(struct parser *ps) {
    while (ps->p < ps->end) {
        if (*ps->p == ' ' || *ps->p == '\t' || *ps->p == '\n' || *ps->p == '\r') {
            ps->p++;
        } else if (ps->end - ps->p >= 2 && ps->p[0] == '/' && ps->p[1] == '/') {
            while (ps->p < ps->end && *ps->p != '\n')
                ps->p++;
        } else {
            return;
        }
    }
}

static int eat(struct parser *ps, const char *token) {
    skip_space(ps);
    size_t n = strlen(token);
    if ((size_t)(ps->end - ps->p) >= n && memcmp(ps->p, token, n) == 0) {
        ps->p += n;
        return 1;
    }
    return 0;
}

/* A RON string literal with \" and \\ escapes; returns a malloc'd copy or NULL. */
static char *string_literal(struct parser *ps) {
    if (!eat(ps, "\""))
        return NULL;
    char *out = malloc((size_t)(ps->end - ps->p) + 1);
    size_t n = 0;
    if (!out)
        return NULL;
    while (ps->p < ps->end && *ps->p != '"') {
        if (*ps->p == '\\') {
            if (ps->p + 1 >= ps->end || (ps->p[1] != '"' && ps->p[1] != '\\')) {
                free(out);
                return NULL;
            }
            ps->p++;
        }
        if (*ps->p == '\0') {
            free(out);
            return NULL;
        }
        out[n++] = *ps->p++;
    }
    if (ps->p >= ps->end) {
        free(out);
        return NULL;
    }
    ps->p++;
    out[n] = '\0';
    return out;
}

static void free_argv(char **argv) {
    for (char **a = argv; a && *a; a++)
        free(*a);
    free(argv);
}

/* Returns a NULL-terminated argv, or NULL with a message in `why`. */
static char **parse_options(PwStr options, char *why, size_t why_len) {
    struct parser ps = {options.ptr, options.ptr + options.len};
    char **argv = calloc(1, sizeof *argv);
    size_t argc = 0;
    if (!argv) {
        snprintf(why, why_len, "out of memory");
        return NULL;
    }
    if (!options.ptr || !eat(&ps, "(") || !eat(&ps, "command") || !eat(&ps, ":") || !eat(&ps, "[")) {
        snprintf(why, why_len, "expected (command: [\"/program\", \"arg\", ...])");
        goto bad;
    }
    while (!eat(&ps, "]")) {
        char *arg = string_literal(&ps);
        if (!arg) {
            snprintf(why, why_len, "command: expected a string (only \\\" and \\\\ escapes)");
            goto bad;
        }
        char **grown = realloc(argv, (argc + 2) * sizeof *argv);
        if (!grown) {
            free(arg);
            snprintf(why, why_len, "out of memory");
            goto bad;
        }
        argv = grown;
        argv[argc++] = arg;
        argv[argc] = NULL;
        if (!eat(&ps, ",")) {
            if (!eat(&ps, "]")) {
                snprintf(why, why_len, "command: expected ',' or ']'");
                goto bad;
            }
            break;
        }
    }
    eat(&ps, ",");
    if (!eat(&ps, ")")) {
        snprintf(why, why_len, "unknown field: only `command` is allowed");
        goto bad;
    }
    skip_space(&ps);
    if (ps.p != ps.end) {
        snprintf(why, why_len, "trailing text after the options");
        goto bad;
    }
    if (argc == 0 || argv[0][0] != '/') {
        snprintf(why, why_len, "command: must start with an absolute program path");
        goto bad;
    }
    return argv;
bad:
    free_argv(argv);
    return NULL;
}

/* ---- create / destroy --------------------------------------------------- */

static int32_t cdemo_create(const PwHostV1 *host, PwStr options, void **instance, PwErrorBuf *error) {
    if (!host || host->size < sizeof(PwHostV1) || !instance)
        return fail(error, PW_ERR_INVALID, "cdemo: null or short host table");
    char why[256];
    char **argv = parse_options(options, why, sizeof why);
    if (!argv)
        return fail(error, PW_ERR_OPTIONS, "options: %s", why);
    struct instance *inst = calloc(1, sizeof *inst);
    if (!inst) {
        free_argv(argv);
        return fail(error, PW_ERR_FAILED, "cdemo: out of memory");
    }
    inst->host = *host;
    inst->argv = argv;
    inst->refs = 1;
    pthread_mutex_init(&inst->lock, NULL);
    pthread_condattr_t attr;
    pthread_condattr_init(&attr);
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    pthread_cond_init(&inst->changed, &attr);
    pthread_condattr_destroy(&attr);
    *instance = inst;
    return PW_OK;
}

static void cdemo_destroy(void *instance) {
    if (instance)
        release(instance);
}

/* ---- reaping ------------------------------------------------------------ */

static void *reap(void *arg) {
    struct reaper r = *(struct reaper *)arg;
    free(arg);
    siginfo_t info;
    memset(&info, 0, sizeof info);
    /* Wait without reaping, so the pid (and its process group) cannot be reused
     * while stop() may still signal it. */
    while (waitid(P_PID, (id_t)r.pid, &info, WEXITED | WNOWAIT) < 0 && errno == EINTR) {
    }
    kill(-r.pid, SIGKILL); /* whatever the guest left in its process group */
    pthread_mutex_lock(&r.inst->lock);
    for (struct guest **g = &r.inst->guests; *g; g = &(*g)->next) {
        if ((*g)->id == r.id) {
            struct guest *gone = *g;
            *g = gone->next;
            free(gone);
            break;
        }
    }
    pthread_cond_broadcast(&r.inst->changed);
    pthread_mutex_unlock(&r.inst->lock);
    while (waitpid(r.pid, NULL, 0) < 0 && errno == EINTR) {
    }
    PwGuestExit exit = {sizeof exit, PW_EXIT_UNKNOWN, 0};
    if (info.si_code == CLD_EXITED) {
        exit.kind = PW_EXIT_EXITED;
        exit.code = info.si_status;
    } else if (info.si_code == CLD_KILLED || info.si_code == CLD_DUMPED) {
        exit.kind = PW_EXIT_SIGNALED;
        exit.code = info.si_status;
    }
    host_log(r.inst, PW_LOG_DEBUG, "cdemo: pid %d of guest %llu ended", (int)r.pid,
             (unsigned long long)r.id);
    /* Exactly once per started guest, from this thread. */
    if (r.inst->host.guest_stopped)
        r.inst->host.guest_stopped(r.inst->host.ctx, r.id, &exit);
    release(r.inst);
    return NULL;
}

/* ---- activate ------------------------------------------------------------ */

static size_t str_len(const char *s) {
    size_t n = 0;
    while (s[n])
        n++;
    return n;
}

static char *var(const char *name, PwStr value) {
    size_t n = strlen(name);
    char *v = malloc(n + 1 + value.len + 1);
    if (!v)
        return NULL;
    memcpy(v, name, n);
    v[n] = '=';
    if (value.len)
        memcpy(v + n + 1, value.ptr, value.len);
    v[n + 1 + value.len] = '\0';
    return v;
}

static void free_env(char **env) {
    for (char **e = env; e && *e; e++)
        free(*e);
    free(env);
}

/* The guest's environment: the daemon's (less LISTEN_*), the unit's extra
 * variables, and LISTEN_*; `*pid_slot` points at LISTEN_PID's digits, which the
 * child fills in after fork. */
static char **guest_env(const PwActivation *a, char **pid_slot) {
    size_t count = 0;
    for (char **e = environ; e && *e; e++)
        count++;
    char **env = calloc(count + a->env_count + 4, sizeof *env);
    size_t n = 0;
    if (!env)
        return NULL;
    for (char **e = environ; e && *e; e++) {
        if (strncmp(*e, "LISTEN_", 7) == 0)
            continue;
        if (!(env[n++] = strdup(*e)))
            goto oom;
    }
    for (size_t i = 0; i < a->env_count; i++) {
        char name[256];
        size_t len = a->env[i].name.len < sizeof name - 1 ? a->env[i].name.len : sizeof name - 1;
        memcpy(name, a->env[i].name.ptr, len);
        name[len] = '\0';
        if (!(env[n++] = var(name, a->env[i].value)))
            goto oom;
    }
    char count_text[32];
    int written = snprintf(count_text, sizeof count_text, "%zu", a->fd_count);
    if (!(env[n++] = var("LISTEN_FDS", (PwStr){count_text, (size_t)written})))
        goto oom;
    size_t names_len = 0;
    for (size_t i = 0; i < a->fd_count; i++)
        names_len += a->fds[i].name.len + 1;
    char *names = malloc(names_len + 1);
    if (!names)
        goto oom;
    size_t at = 0;
    for (size_t i = 0; i < a->fd_count; i++) {
        if (i)
            names[at++] = ':';
        if (a->fds[i].name.len)
            memcpy(names + at, a->fds[i].name.ptr, a->fds[i].name.len);
        at += a->fds[i].name.len;
    }
    env[n++] = var("LISTEN_FDNAMES", (PwStr){names, at});
    free(names);
    if (!env[n - 1])
        goto oom;
    if (!(env[n++] = var("LISTEN_PID", (PwStr){"                    ", 20})))
        goto oom;
    *pid_slot = env[n - 1] + str_len("LISTEN_PID=");
    return env;
oom:
    free_env(env);
    return NULL;
}

/* In the child, between fork and exec: async-signal-safe calls only. */
static void child(const PwActivation *a, char **argv, char **env, char *pid_slot, int report) {
    int n = (int)a->fd_count;
    int first_free = 3 + n;
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    setpgid(0, 0);
    /* Lift every source fd (and the report pipe) above the target range, then
     * place them at 3, 4, ...; dup2 clears close-on-exec on the copies only. */
    report = fcntl(report, F_DUPFD_CLOEXEC, first_free);
    int lifted[256];
    if (report < 0 || n > 256)
        _exit(126);
    for (int i = 0; i < n; i++) {
        lifted[i] = fcntl(a->fds[i].fd, F_DUPFD_CLOEXEC, first_free);
        if (lifted[i] < 0)
            goto failed;
    }
    for (int i = 0; i < n; i++) {
        if (dup2(lifted[i], 3 + i) < 0)
            goto failed;
    }
    /* Nothing else of the daemon's survives exec. */
    if (syscall(SYS_close_range, (unsigned)first_free, ~0U, CLOSE_RANGE_CLOEXEC) < 0) {
        for (int fd = first_free; fd < 65536; fd++)
            if (fd != report)
                fcntl(fd, F_SETFD, FD_CLOEXEC);
    }
    /* LISTEN_PID: this process's pid, formatted without stdio. */
    pid_t pid = getpid();
    char digits[20];
    int len = 0;
    do {
        digits[len++] = (char)('0' + pid % 10);
        pid /= 10;
    } while (pid > 0 && len < 20);
    for (int i = 0; i < len; i++)
        pid_slot[i] = digits[len - 1 - i];
    pid_slot[len] = '\0';
    execve(argv[0], argv, env);
failed:;
    int err = errno;
    ssize_t ignored = write(report, &err, sizeof err);
    (void)ignored;
    _exit(127);
}

static int32_t cdemo_activate(void *instance, const PwActivation *a, PwGuestInfo *info, PwErrorBuf *error) {
    struct instance *inst = instance;
    if (!inst || !a || a->size < sizeof(PwActivation) || (a->fd_count && !a->fds) ||
        (a->env_count && !a->env))
        return fail(error, PW_ERR_INVALID, "cdemo: null or short activation");
    if (a->fd_count > 256)
        return fail(error, PW_ERR_FAILED, "cdemo: at most 256 listeners, got %zu", a->fd_count);
    char *pid_slot = NULL;
    char **env = guest_env(a, &pid_slot);
    if (!env)
        return fail(error, PW_ERR_FAILED, "cdemo: out of memory");
    struct guest *g = calloc(1, sizeof *g);
    struct reaper *r = calloc(1, sizeof *r);
    int pipefd[2];
    if (!g || !r || pipe2(pipefd, O_CLOEXEC) < 0) {
        int err = errno;
        free(g);
        free(r);
        free_env(env);
        return fail(error, PW_ERR_FAILED, "cdemo: cannot prepare the guest: %s", strerror(err));
    }
    pid_t pid = fork();
    if (pid == 0)
        child(a, inst->argv, env, pid_slot, pipefd[1]);
    int fork_errno = errno;
    close(pipefd[1]);
    free_env(env);
    if (pid < 0) {
        close(pipefd[0]);
        free(g);
        free(r);
        return fail(error, PW_ERR_FAILED, "cdemo: fork: %s", strerror(fork_errno));
    }
    int exec_errno = 0;
    ssize_t got;
    while ((got = read(pipefd[0], &exec_errno, sizeof exec_errno)) < 0 && errno == EINTR) {
    }
    close(pipefd[0]);
    if (got == (ssize_t)sizeof exec_errno) {
        while (waitpid(pid, NULL, 0) < 0 && errno == EINTR) {
        }
        free(g);
        free(r);
        return fail(error, PW_ERR_FAILED, "cdemo: cannot run %s: %s", inst->argv[0], strerror(exec_errno));
    }
    g->id = a->guest;
    g->pid = pid;
    *r = (struct reaper){inst, a->guest, pid};
    pthread_mutex_lock(&inst->lock);
    g->next = inst->guests;
    inst->guests = g;
    inst->refs++;
    pthread_mutex_unlock(&inst->lock);
    pthread_t thread;
    int err = pthread_create(&thread, NULL, reap, r);
    if (err != 0) {
        /* No reaper: undo, so that no stop is ever reported for this guest. */
        kill(-pid, SIGKILL);
        while (waitpid(pid, NULL, 0) < 0 && errno == EINTR) {
        }
        pthread_mutex_lock(&inst->lock);
        for (struct guest **p = &inst->guests; *p; p = &(*p)->next) {
            if (*p == g) {
                *p = g->next;
                break;
            }
        }
        inst->refs--;
        pthread_mutex_unlock(&inst->lock);
        free(g);
        free(r);
        return fail(error, PW_ERR_FAILED, "cdemo: cannot start the reaper thread: %s", strerror(err));
    }
    pthread_detach(thread);
    host_log(inst, PW_LOG_INFO, "cdemo: started %s as pid %d with %zu fds", inst->argv[0], (int)pid,
             a->fd_count);
    if (info && info->size >= offsetof(PwGuestInfo, pid) + sizeof info->pid)
        info->pid = pid;
    return PW_OK;
}

/* ---- stop ------------------------------------------------------------------ */

static pid_t running(struct instance *inst, uint64_t id) {
    for (struct guest *g = inst->guests; g; g = g->next)
        if (g->id == id)
            return g->pid;
    return 0;
}

/* Waits (lock held) until the guest left the list or `ms` passed; returns its pid if still there. */
static pid_t wait_gone(struct instance *inst, uint64_t id, uint64_t ms) {
    struct timespec deadline;
    clock_gettime(CLOCK_MONOTONIC, &deadline);
    deadline.tv_sec += (time_t)(ms / 1000);
    deadline.tv_nsec += (long)(ms % 1000) * 1000000L;
    if (deadline.tv_nsec >= 1000000000L) {
        deadline.tv_sec++;
        deadline.tv_nsec -= 1000000000L;
    }
    pid_t pid;
    while ((pid = running(inst, id)) != 0) {
        if (pthread_cond_timedwait(&inst->changed, &inst->lock, &deadline) == ETIMEDOUT)
            return running(inst, id);
    }
    return 0;
}

static int32_t cdemo_stop(void *instance, uint64_t guest, uint64_t timeout_ms, PwErrorBuf *error) {
    struct instance *inst = instance;
    if (!inst)
        return fail(error, PW_ERR_INVALID, "cdemo: null instance");
    pthread_mutex_lock(&inst->lock);
    pid_t pid = running(inst, guest);
    if (pid == 0) {
        /* Unknown or already gone: its exit is (being) reported by the reaper. */
        pthread_mutex_unlock(&inst->lock);
        return PW_OK;
    }
    /* While the guest is listed its pid is not reaped, so it cannot be reused. */
    kill(-pid, SIGTERM);
    if (wait_gone(inst, guest, timeout_ms) != 0) {
        host_log(inst, PW_LOG_WARN, "cdemo: pid %d ignored SIGTERM for %llu ms; killing it", (int)pid,
                 (unsigned long long)timeout_ms);
        kill(-pid, SIGKILL);
        if (wait_gone(inst, guest, 5000) != 0) {
            pthread_mutex_unlock(&inst->lock);
            return fail(error, PW_ERR_FAILED, "cdemo: pid %d did not exit after SIGKILL", (int)pid);
        }
    }
    pthread_mutex_unlock(&inst->lock);
    return PW_OK;
}

/* ---- the entry table --------------------------------------------------------- */

static const PwPluginV1 ENTRY = {
    sizeof(PwPluginV1),
    PW_ABI_MAJOR,
    PW_ABI_MINOR,
    "cdemo",
    "0.1.0",
    cdemo_create,
    cdemo_activate,
    cdemo_stop,
    cdemo_destroy,
    NULL, /* adopt (ABI 1.1): this plugin cannot take over guests after a restart */
};

__attribute__((visibility("default"))) const struct PwPluginV1 *portwake_plugin_entry(void) {
    return &ENTRY;
}
