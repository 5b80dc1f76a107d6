/* Single-precision MUMPS LU of a sparse matrix on one process, for fem_anode's lagged
 * preconditioner (mumps_single.py): the one-rank LU, and on several ranks each rank's own block
 * of the substructured LU (with a Schur complement on its interface unknowns). The matrix is
 * given as 1-based coordinates (ICNTL(18) = 3 on MPI_COMM_SELF), the right-hand side dense and
 * overwritten by the solution (ICNTL(20) = ICNTL(21) = 0). */
#include <stdint.h>
#include <stdlib.h>
#include <mpi.h>
#include <smumps_c.h>

typedef struct {
    SMUMPS_STRUC_C id;
} fa_lu;

static int fa_run(fa_lu *h, int job)
{
    h->id.job = job;
    smumps_c(&h->id);
    return h->id.infog[0];
}

void *fa_lu_create(void)
{
    fa_lu *h = calloc(1, sizeof(fa_lu));
    if (!h) return NULL;
    h->id.par = 1;
    h->id.sym = 0;
    h->id.comm_fortran = (MUMPS_INT)MPI_Comm_c2f(MPI_COMM_SELF);
    if (fa_run(h, -1) < 0) {
        free(h);
        return NULL;
    }
    h->id.icntl[0] = -1; /* no error, diagnostic or global output: the caller reports */
    h->id.icntl[1] = -1;
    h->id.icntl[2] = -1;
    h->id.icntl[3] = 0;
    h->id.icntl[13] = 80; /* ICNTL(14): workspace head-room (%) for delayed pivots */
    h->id.icntl[17] = 3;  /* ICNTL(18): the entries given as coordinates */
    h->id.icntl[19] = 0;  /* ICNTL(20): dense right-hand side */
    h->id.icntl[20] = 0;  /* ICNTL(21): the solution overwrites it */
    return h;
}

void fa_lu_set_icntl(void *p, int i, int value) { ((fa_lu *)p)->id.icntl[i - 1] = value; }

/* A pivot order given by the caller (ICNTL(7) = 1; perm_in[i - 1]: the position of variable
 * i, 1-based), set before the analysis; NULL: MUMPS's own choice again. */
void fa_lu_set_perm(void *p, MUMPS_INT *perm_in)
{
    fa_lu *h = p;
    h->id.perm_in = perm_in;
    h->id.icntl[6] = perm_in ? 1 : 7;
}

/* Eliminate all variables but the 1-based listvar (the Schur variables, ICNTL(19) = 1: set
 * before the analysis); the factorisation then writes their size x size Schur complement, row
 * by row, into schur. */
void fa_lu_set_schur(void *p, int size, MUMPS_INT *listvar, float *schur)
{
    fa_lu *h = p;
    h->id.size_schur = size;
    h->id.listvar_schur = listvar;
    h->id.schur = schur;
    h->id.icntl[18] = size > 0 ? 1 : 0;
}

int fa_lu_analyse(void *p, int n, int64_t nnz, MUMPS_INT *irn, MUMPS_INT *jcn)
{
    fa_lu *h = p;
    h->id.n = n;
    h->id.nnz_loc = nnz;
    h->id.irn_loc = irn;
    h->id.jcn_loc = jcn;
    return fa_run(h, 1);
}

/* Numeric factorisation with the values a (same pattern as at the analysis). */
int fa_lu_factor(void *p, float *a)
{
    fa_lu *h = p;
    h->id.a_loc = a;
    return fa_run(h, 2);
}

/* Solve with the dense right-hand side rhs. phase 0: the whole solve, the solution overwrites
 * rhs. With a Schur complement, phase 1 (condensation, ICNTL(26) = 1) eliminates the interior
 * and writes the reduced right-hand side of the Schur variables into redrhs; phase 2
 * (expansion) takes their solution from redrhs and writes the whole solution into rhs. */
int fa_lu_solve(void *p, int phase, float *rhs, float *redrhs)
{
    fa_lu *h = p;
    h->id.nrhs = 1;
    h->id.lrhs = h->id.n > 0 ? h->id.n : 1;
    h->id.rhs = rhs;
    h->id.redrhs = redrhs;
    h->id.lredrhs = h->id.size_schur > 0 ? h->id.size_schur : 1;
    h->id.icntl[25] = phase;
    int err = fa_run(h, 3);
    h->id.icntl[25] = 0;
    return err;
}

int fa_lu_infog(void *p, int i) { return ((fa_lu *)p)->id.infog[i - 1]; }

void fa_lu_destroy(void *p)
{
    fa_lu *h = p;
    if (!h) return;
    fa_run(h, -2);
    free(h);
}
