// Host-clock timing of one host call (a driver call, a round trip the CPU waits for) for the
// GPU machine's microbenchmarks: 200 untimed calls, then the median of `reps` timed ones in
// microseconds; *p90, when asked, the 90th percentile.
#pragma once
#include <algorithm>
#include <chrono>
#include <vector>

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
