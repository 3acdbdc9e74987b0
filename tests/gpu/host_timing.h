// Host-clock timing of one host call (a driver call, a round trip the CPU waits for) for the
// GPU machine's microbenchmarks: 200 untimed calls, then the median of `reps` timed ones in
// microseconds; *p90, when asked, the 90th percentile.  And CHECK: a CUDA, driver or CUPTI
// call that must return 0, else the probe stops with the call and its line.
#pragma once
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>

#define CHECK(x)                                                                               \
    do {                                                                                       \
        if ((x) != 0) {                                                                        \
            std::fprintf(stderr, "%s: %s failed at line %d\n", __FILE__, #x, __LINE__);          \
            std::exit(1);                                                                      \
        }                                                                                      \
    } while (0)

template <class F>
static double median_us(F f, int reps = 20000, double *p90 = nullptr) {
    for (int i = 0; i < 200; i++) f();
    std::vector<double> t(reps);
    for (int i = 0; i < reps; i++) {
        auto a = std::chrono::steady_clock::now();
        f();
        auto b = std::chrono::steady_clock::now();
        t[i] = std::chrono::duration<double, std::micro>(b - a).count();
    }
    std::nth_element(t.begin(), t.begin() + reps / 2, t.end());
    double median = t[reps / 2];
    if (p90) {
        std::nth_element(t.begin(), t.begin() + reps * 9 / 10, t.end());
        *p90 = t[reps * 9 / 10];
    }
    return median;
}
