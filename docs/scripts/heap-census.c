/*
 * heap-census.c: an LD_PRELOAD shim for docs/scripts/heap-census.sh.
 *
 * It records every live heap block of the process it is loaded into
 * (address, size, allocation number) in a hash table of its own (mmap'd,
 * outside the heap it watches), counts the allocations by size, and
 * keeps the peak of the live bytes. When the file named by
 * CENSUS_TRIGGER appears it writes, to CENSUS_OUT:
 *
 *   ADDR SIZE SEQ TID one line per live block (ADDR in hex; TID the
 *                     allocating thread, whose glibc arena it came from)
 *   A SIZE COUNT      allocations ever made of that size (65536: larger)
 *   P BYTES           the peak of the live bytes
 *
 * Which pages hold a live byte is then what the allocator cannot give
 * back: docs/results.md, "Memory per idle connection". A diagnostic tool:
 * one global lock around every malloc and free, so it slows the server.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

extern void *__libc_malloc(size_t);
extern void __libc_free(void *);
extern void *__libc_calloc(size_t, size_t);
extern void *__libc_realloc(void *, size_t);
extern void *__libc_memalign(size_t, size_t);

#define SLOTS (1u << 24)
#define GONE ((uintptr_t)1)
typedef struct { uintptr_t addr; uint32_t size; uint32_t seq; uint32_t tid; } slot;

static slot *table;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static uint32_t seq;
static unsigned long by_size[65537];
static unsigned long live_bytes, peak_bytes;

static size_t hash(uintptr_t addr) {
  return (size_t)(((addr >> 4) * 0x9E3779B97F4A7C15ull) >> 40) & (SLOTS - 1);
}

static void ensure_table(void) {
  if (!table)
    table = mmap(0, sizeof(slot) * (size_t)SLOTS, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
}

/* The allocating thread, cached: which glibc arena a block came from. */
static __thread __attribute__((tls_model("initial-exec"))) uint32_t my_tid;

static void remember(void *ptr, size_t size) {
  if (!ptr) return;
  if (!my_tid) my_tid = (uint32_t)syscall(SYS_gettid);
  pthread_mutex_lock(&lock);
  ensure_table();
  size_t i = hash((uintptr_t)ptr);
  while (table[i].addr > GONE) i = (i + 1) & (SLOTS - 1);
  table[i] = (slot){(uintptr_t)ptr, (uint32_t)size, ++seq, my_tid};
  by_size[size > 65536 ? 65536 : size]++;
  live_bytes += size;
  if (live_bytes > peak_bytes) peak_bytes = live_bytes;
  pthread_mutex_unlock(&lock);
}

static void forget(void *ptr) {
  if (!ptr) return;
  pthread_mutex_lock(&lock);
  ensure_table();
  for (size_t i = hash((uintptr_t)ptr); table[i].addr; i = (i + 1) & (SLOTS - 1)) {
    if (table[i].addr == (uintptr_t)ptr) {
      table[i].addr = GONE;
      live_bytes -= table[i].size;
      break;
    }
  }
  pthread_mutex_unlock(&lock);
}

void *malloc(size_t n) { void *p = __libc_malloc(n); remember(p, n); return p; }
void *calloc(size_t a, size_t b) { void *p = __libc_calloc(a, b); remember(p, a * b); return p; }
void free(void *p) { forget(p); __libc_free(p); }
void *realloc(void *p, size_t n) {
  forget(p);
  void *q = __libc_realloc(p, n);
  if (q) remember(q, n); else if (p && n) remember(p, n);
  return q;
}
void *memalign(size_t align, size_t n) { void *p = __libc_memalign(align, n); remember(p, n); return p; }
void *aligned_alloc(size_t align, size_t n) { return memalign(align, n); }
int posix_memalign(void **out, size_t align, size_t n) {
  void *p = memalign(align, n);
  if (!p) return 12; /* ENOMEM */
  *out = p;
  return 0;
}

static void write_census(const char *path) {
  int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd < 0) return;
  char line[96];
  pthread_mutex_lock(&lock);
  for (size_t i = 0; table && i < SLOTS; i++) {
    if (table[i].addr > GONE) {
      int len = snprintf(line, sizeof line, "%lx %u %u %u\n", (unsigned long)table[i].addr,
                         table[i].size, table[i].seq, table[i].tid);
      if (write(fd, line, len) != len) break;
    }
  }
  for (int size = 0; size <= 65536; size++) {
    if (by_size[size]) {
      int len = snprintf(line, sizeof line, "A %d %lu\n", size, by_size[size]);
      if (write(fd, line, len) != len) break;
    }
  }
  int len = snprintf(line, sizeof line, "P %lu\n", peak_bytes);
  if (write(fd, line, len) != len) {}
  pthread_mutex_unlock(&lock);
  close(fd);
}

static void *watch(void *unused) {
  (void)unused;
  const char *trigger = getenv("CENSUS_TRIGGER");
  const char *out = getenv("CENSUS_OUT");
  if (!trigger || !out) return 0;
  for (;;) {
    if (access(trigger, F_OK) == 0) {
      unlink(trigger);
      write_census(out);
    }
    usleep(100000);
  }
}

__attribute__((constructor)) static void start(void) {
  pthread_t thread;
  if (pthread_create(&thread, 0, watch, 0) == 0) pthread_detach(thread);
}
