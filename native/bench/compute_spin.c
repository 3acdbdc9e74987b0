/* The compute of `commlib bench overlap`'s Python rows, loaded with ctypes (which releases
 * the GIL for the call): the same floating-point dependency chain as bench_overlap.c's
 * compute() - one core, no memory traffic, no MPI calls - so that the Python rows and the
 * C program's rows compute alike and differ only in who posts the all-reduce. */
static volatile double sink;

void commlib_bench_spin(long loops)
{
    double a = 1.0, c = 1e-9;
    for (long i = 0; i < loops; i++) a = a * 0.9999999 + c;
    sink = a;
}
