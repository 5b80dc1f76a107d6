/* Single-precision MUMPS LU of a distributed sparse matrix, for fem_anode's lagged
 * preconditioner (mumps_single.py). The matrix is given in distributed assembled form
 * (ICNTL(18) = 3: each process its entries with 1-based global indices); on several processes
 * the right-hand side distributed by rows (ICNTL(20) = 10) and the solution returned distributed
 * (ICNTL(21) = 1, in MUMPS's own distribution: sol_loc at the 1-based global rows isol_loc), on
 * one process both dense and in place (ICNTL(20) = ICNTL(21) = 0: the same solution, about 8 %
 * faster a solve). */
#include <stdint.h>
#include <stdlib.h>
#include <mpi.h>
#include <smumps_c.h>

typedef struct {
    SMUMPS_STRUC_C id;
    float *sol;
    MUMPS_INT *isol;
    int central; /* one process: dense right-hand side, overwritten by the solution */
} fa_lu;

static int fa_run(fa_lu *h, int job)
{
    h->id.job = job;
    smumps_c(&h->id);
    return h->id.infog[0];
}

void *fa_lu_create(int comm_fortran)
{
    fa_lu *h = calloc(1, sizeof(fa_lu));
    if (!h) return NULL;
    h->id.par = 1;
    h->id.sym = 0;
    h->id.comm_fortran = comm_fortran;
    if (fa_run(h, -1) < 0) {
        free(h);
        return NULL;
    }
    h->id.icntl[0] = -1; /* no error, diagnostic or global output: the caller reports */
    h->id.icntl[1] = -1;
    h->id.icntl[2] = -1;
    h->id.icntl[3] = 0;
    h->id.icntl[13] = 80; /* ICNTL(14): workspace head-room (%) for delayed pivots */
    h->id.icntl[17] = 3; /* ICNTL(18): distributed assembled matrix */
    int size = 1;
    MPI_Comm_size(MPI_Comm_f2c(comm_fortran), &size);
    h->central = size == 1;
    h->id.icntl[19] = h->central ? 0 : 10; /* ICNTL(20): dense / distributed right-hand side */
    h->id.icntl[20] = h->central ? 0 : 1;  /* ICNTL(21): in place / distributed solution */
    return h;
}

int fa_lu_central(void *p) { return ((fa_lu *)p)->central; }

void fa_lu_set_icntl(void *p, int i, int value) { ((fa_lu *)p)->id.icntl[i - 1] = value; }

int fa_lu_analyse(void *p, int n, int64_t nnz_loc, MUMPS_INT *irn_loc, MUMPS_INT *jcn_loc)
{
    fa_lu *h = p;
    h->id.n = n;
    h->id.nnz_loc = nnz_loc;
    h->id.irn_loc = irn_loc;
    h->id.jcn_loc = jcn_loc;
    return fa_run(h, 1);
}

/* Numeric factorisation with the values a_loc (same pattern as at the analysis); on success
 * the solution buffers are (re)allocated for INFO(23) entries. */
int fa_lu_factor(void *p, float *a_loc)
{
    fa_lu *h = p;
    h->id.a_loc = a_loc;
    int err = fa_run(h, 2);
    if (err < 0) return err;
    int lsol = h->id.info[22];
    free(h->sol);
    free(h->isol);
    h->sol = malloc((lsol > 0 ? lsol : 1) * sizeof(float));
    h->isol = malloc((lsol > 0 ? lsol : 1) * sizeof(MUMPS_INT));
    if (!h->sol || !h->isol) return -13;
    h->id.sol_loc = h->sol;
    h->id.isol_loc = h->isol;
    h->id.lsol_loc = lsol;
    return err;
}

/* Solve with the right-hand side rhs_loc (rows irhs_loc; one process: all rows in order, and
 * the solution overwrites rhs_loc). */
int fa_lu_solve(void *p, int nloc_rhs, MUMPS_INT *irhs_loc, float *rhs_loc)
{
    fa_lu *h = p;
    h->id.nrhs = 1;
    if (h->central) {
        h->id.lrhs = nloc_rhs > 0 ? nloc_rhs : 1;
        h->id.rhs = rhs_loc;
        return fa_run(h, 3);
    }
    h->id.nloc_rhs = nloc_rhs;
    h->id.lrhs_loc = nloc_rhs > 0 ? nloc_rhs : 1;
    h->id.irhs_loc = irhs_loc;
    h->id.rhs_loc = rhs_loc;
    return fa_run(h, 3);
}

/* A pivot order given by the caller (ICNTL(7) = 1; perm_in[i - 1]: the position of variable
 * i, 1-based), set before the analysis; NULL: MUMPS's own choice again. */
void fa_lu_set_perm(void *p, MUMPS_INT *perm_in)
{
    fa_lu *h = p;
    h->id.perm_in = perm_in;
    h->id.icntl[6] = perm_in ? 1 : 7;
}

/* One process: eliminate all variables but the 1-based listvar (the Schur variables, ICNTL(19)
 * = 1: set before the analysis); the factorisation then writes their size x size Schur
 * complement, row by row, into schur. */
void fa_lu_set_schur(void *p, int size, MUMPS_INT *listvar, float *schur)
{
    fa_lu *h = p;
    h->id.size_schur = size;
    h->id.listvar_schur = listvar;
    h->id.schur = schur;
    h->id.icntl[18] = size > 0 ? 1 : 0;
}

/* One process, with a Schur complement: phase 1 (condensation, ICNTL(26) = 1) eliminates the
 * interior of the dense right-hand side rhs and writes the reduced right-hand side of the Schur
 * variables into redrhs; phase 2 (expansion) takes their solution from redrhs and writes the
 * whole solution into rhs. */
int fa_lu_solve_reduced(void *p, int phase, float *rhs, float *redrhs)
{
    fa_lu *h = p;
    h->id.nrhs = 1;
    h->id.lrhs = h->id.n;
    h->id.rhs = rhs;
    h->id.redrhs = redrhs;
    h->id.lredrhs = h->id.size_schur > 0 ? h->id.size_schur : 1;
    h->id.icntl[25] = phase;
    int err = fa_run(h, 3);
    h->id.icntl[25] = 0;
    return err;
}

int fa_lu_lsol(void *p) { return ((fa_lu *)p)->id.lsol_loc; }
float *fa_lu_sol(void *p) { return ((fa_lu *)p)->sol; }
MUMPS_INT *fa_lu_isol(void *p) { return ((fa_lu *)p)->isol; }
int fa_lu_infog(void *p, int i) { return ((fa_lu *)p)->id.infog[i - 1]; }

void fa_lu_destroy(void *p)
{
    fa_lu *h = p;
    if (!h) return;
    fa_run(h, -2);
    free(h->sol);
    free(h->isol);
    free(h);
}
