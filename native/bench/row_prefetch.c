/* The prefetch question of native/pack/host_pack.c's row kernels, alone: one packing loop
 * of B-byte blocks `stride` apart as host_pack.c writes it (16 blocks unrolled), with its
 * prefetches 16 blocks ahead, without them, and as a plain loop, warm (packed over and
 * over) and cold (after 256 MiB of other writes); best of 60 (cold 15) per variant,
 * interleaved.  Not built by setup.py:
 *
 *   gcc -O3 -o /tmp/row_prefetch native/bench/row_prefetch.c && /tmp/row_prefetch
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stdint.h>
#include <time.h>
#define UNROLLED _Pragma("GCC unroll 16")
#define UNMERGED(B, p) do { if (B < 8) __asm__("" : "+r"(p)); } while (0)
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
#define K(NAME, B, AHEAD, BATCH, PF) \
__attribute__((noinline)) static void NAME(char *restrict packed, const char *restrict typed, int64_t n, int64_t stride){ \
  enum{batch=BATCH}; int64_t i=0; \
  if (PF) for (; i + AHEAD + batch <= n; i += batch, packed += batch*B, typed += batch*stride) \
    UNROLLED for (int k=0;k<batch;k++){ __builtin_prefetch(typed+(AHEAD+k)*stride,0,3); memcpy(packed+k*B, typed+k*stride, B); UNMERGED(B,packed);} \
  for (; i + batch <= n; i += batch, packed += batch*B, typed += batch*stride) \
    UNROLLED for (int k=0;k<batch;k++){ memcpy(packed+k*B, typed+k*stride, B); UNMERGED(B,packed);} \
  for (; i<n; i++, packed+=B, typed+=stride) memcpy(packed, typed, B); } \
__attribute__((noinline, unused)) static void NAME##_simple(char *restrict packed, const char *restrict typed, int64_t n, int64_t stride){ \
  for (int64_t i=0;i<n;i++) memcpy(packed+i*B, typed+i*stride, B); }
K(b1pf, 1, 16, 16, 1) K(b1no, 1, 16, 16, 0)
K(b2pf, 2, 16, 16, 1) K(b2no, 2, 16, 16, 0)
K(b8pf, 8, 16, 16, 1) K(b8no, 8, 16, 16, 0)
K(b24pf, 24, 16, 8, 1) K(b24no, 24, 16, 8, 0)
typedef void (*fn)(char*,const char*,int64_t,int64_t);
int main(void){
  char *junk = malloc(256<<20); memset(junk,2,256<<20);
  struct {int B; fn f[3]; } ks[] = {{1,{b1pf,b1no,b1pf_simple}},{2,{b2pf,b2no,b2pf_simple}},{8,{b8pf,b8no,b8pf_simple}},{24,{b24pf,b24no,b24pf_simple}}};
  struct {int64_t packed_bytes, stride; int cold;} cases[] = {{1024,512,0},{4<<20,512,0},{512<<10,2048,1},{512<<10,2048,0},{64<<10,2048,1}};
  for (int c=0;c<5;c++) for (int k=0;k<4;k++){
    int B=ks[k].B; int64_t n=cases[c].packed_bytes/B, stride=cases[c].stride; if (B>=stride) continue;
    if ((double)n*stride > 1.2e9) continue;
    char *typed=malloc(n*stride+64), *packed=malloc(n*B); memset(typed,1,n*stride);
    double best[3]={1e9,1e9,1e9}; int cold=cases[c].cold;
    for(int r=0;r<(cold?15:60);r++) for(int j=0;j<3;j++){
      if(cold) memset(junk,r,256<<20);
      int reps = cold?1:(n<10000?200:3); double t=now(); for(int q=0;q<reps;q++) ks[k].f[j](packed,typed,n,stride); t=(now()-t)/reps; if(t<best[j])best[j]=t; }
    printf("B=%2d n=%8ld stride=%5ld %s  prefetch %9.3f us  none %9.3f  simple %9.3f  (pf/none %.2f)\n",B,(long)n,(long)stride,cold?"cold":"warm",best[0]*1e6,best[1]*1e6,best[2]*1e6,best[0]/best[1]);
    free(typed); free(packed);
  }
}
