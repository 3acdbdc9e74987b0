/* The unpack prefetch question of native/pack/host_pack.c (UNPACK_PREFETCH), alone:
 * unpacking 8-byte blocks S bytes apart (rows of 512, 64 Ki blocks, as an x face of a halo
 * grid is unpacked) with the 16-block unrolled loop, with and without a write prefetch 16
 * blocks ahead; warm (unpacked over and over) and cold (after reading 600 MiB); best of 9,
 * the variants interleaved.  Not built by setup.py:
 *
 *   gcc -O3 -o /tmp/unpack_prefetch native/bench/unpack_prefetch.c && /tmp/unpack_prefetch
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
static double now(void){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec*1e6+t.tv_nsec*1e-3;}
static void up(char *restrict t, const char *restrict p, int64_t n, int64_t s){ int64_t i=0;
  for(;i+16<=n;i+=16,p+=128,t+=16*s){ _Pragma("GCC unroll 16") for(int k=0;k<16;k++) memcpy(t+k*s,p+k*8,8);}
  for(;i<n;i++,p+=8,t+=s) memcpy(t,p,8);}
static void up_pf(char *restrict t, const char *restrict p, int64_t n, int64_t s){ int64_t i=0;
  for(;i+32<=n;i+=16,p+=128,t+=16*s){ _Pragma("GCC unroll 16") for(int k=0;k<16;k++){ __builtin_prefetch(t+(16+k)*s,1,3); memcpy(t+k*s,p+k*8,8);} }
  for(;i+16<=n;i+=16,p+=128,t+=16*s){ _Pragma("GCC unroll 16") for(int k=0;k<16;k++) memcpy(t+k*s,p+k*8,8);}
  for(;i<n;i++,p+=8,t+=s) memcpy(t,p,8);}
static char *big,*evict; static size_t evict_n; static double sink;
static void do_evict(void){ double s=0; for(size_t i=0;i<evict_n;i+=64) s+=evict[i]; sink+=s; }
int main(void){
  size_t bytes=512ul<<20; big=malloc(bytes); evict_n=600ul<<20; evict=malloc(evict_n);
  memset(big,1,bytes); memset(evict,3,evict_n); char *buf=malloc(262144*8); memset(buf,2,262144*8);
  static const long strides[]={256,512,1024,2064,3000,4112};
  printf("8-byte blocks unpacked, 512-block rows, 64 Ki blocks; best of 9, ns per block\n");
  for(int si=0;si<6;si++){ long S=strides[si]; long nb=65536; if(nb*S>(long)bytes) nb=bytes/S;
    double w[2]={1e30,1e30},c[2]={1e30,1e30};
    for(int r=0;r<9;r++) for(int v=0;v<2;v++){
      void (*f)(char*,const char*,int64_t,int64_t)= v?up_pf:up;
      for(long b=0;b<nb;b+=512) f(big+b*S,buf+b*8,512,S);
      double t0=now(); for(int k=0;k<5;k++) for(long b=0;b<nb;b+=512) f(big+b*S,buf+b*8,512,S); double x=(now()-t0)/5*1e3/nb; if(x<w[v]) w[v]=x;
      do_evict(); t0=now(); for(long b=0;b<nb;b+=512) f(big+b*S,buf+b*8,512,S); x=(now()-t0)*1e3/nb; if(x<c[v]) c[v]=x; }
    printf("stride %5ld: warm %.2f -> %.2f with prefetch   cold %.2f -> %.2f\n",S,w[0],w[1],c[0],c[1]); }
  printf("(sink %g)\n",sink); return 0; }
