/* Counts malloc, calloc and realloc calls of a process (LD_PRELOAD), for
 * bench/alloc-count: allocations per event are a figure that does not drift
 * with the load on the machine the way CPU time does. Prints the totals at
 * exit to stderr and, if MCOUNT_OUT is set, appends them to that file. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <stdatomic.h>
#include <unistd.h>
#include <string.h>
static atomic_ulong n_malloc, n_calloc, n_realloc;
static void *(*real_malloc)(size_t);
static void *(*real_calloc)(size_t,size_t);
static void *(*real_realloc)(void*,size_t);
static char boot[65536]; static size_t boot_used;
static void report(void) {
  char buf[200]; int len = snprintf(buf, sizeof buf, "MCOUNT malloc=%lu calloc=%lu realloc=%lu\n",
    (unsigned long)n_malloc, (unsigned long)n_calloc, (unsigned long)n_realloc);
  const char *p = getenv("MCOUNT_OUT");
  if (p) { FILE *f = fopen(p, "a"); if (f) { fputs(buf, f); fclose(f); } }
  write(2, buf, len);
}
__attribute__((constructor)) static void init(void) {
  real_malloc = dlsym(RTLD_NEXT, "malloc"); real_calloc = dlsym(RTLD_NEXT, "calloc");
  real_realloc = dlsym(RTLD_NEXT, "realloc"); atexit(report);
}
void *malloc(size_t s) { if (!real_malloc) { void *p = boot + boot_used; boot_used += (s + 15) & ~15; return p; } n_malloc++; return real_malloc(s); }
void *calloc(size_t a, size_t b) { if (!real_calloc) { void *p = boot + boot_used; size_t s=a*b; boot_used += (s + 15) & ~15; memset(p,0,s); return p; } n_calloc++; return real_calloc(a,b); }
void *realloc(void *p, size_t s) { n_realloc++; return real_realloc(p, s); }
static void (*real_free)(void*);
void free(void *p) { if ((char*)p >= boot && (char*)p < boot + sizeof boot) return; if (!real_free) real_free = dlsym(RTLD_NEXT, "free"); real_free(p); }
