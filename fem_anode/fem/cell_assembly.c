/* Cell-integral assembly through precomputed positions, for fem_anode's Newton solvers
 * (cell_assembly.py). For every cell the form's own FFCx kernel (tabulate_tensor_float64)
 * computes the element tensor, exactly as dolfinx calls it; each of its entries k is then added
 * to data[positions[k]] if that position is >= 0 (an index in a CSR matrix's values or a vector),
 * to border[-2 - positions[k]] if it is <= -2 (a second array: border vectors and scalars), and
 * skipped if it is -1 (rows or columns of Dirichlet dofs). dolfinx's matrix assembler instead
 * searches every entry's column in its row at every assembly. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef void (*fa_kernel)(double *, const double *, const double *, const double *, const int *,
                          const uint8_t *);

/* Returns 0, or -1 if the work buffers could not be allocated. */
int fa_assemble_cells(uintptr_t kernel, int32_t n_cells, const int32_t *cells, int32_t n_entries,
                      const double *coefficients, int32_t coefficient_stride, const double *constants,
                      const double *x, const int32_t *x_dofmap, int32_t n_x, const int32_t *positions,
                      double *data, double *border)
{
    fa_kernel tabulate = (fa_kernel)kernel;
    double *element = malloc(sizeof(double) * (size_t)n_entries);
    double *coordinates = malloc(sizeof(double) * 3 * (size_t)n_x);
    if (!element || !coordinates) {
        free(element);
        free(coordinates);
        return -1;
    }
    for (int32_t e = 0; e < n_cells; ++e) {
        const int32_t *nodes = x_dofmap + (size_t)cells[e] * n_x;
        for (int32_t i = 0; i < n_x; ++i)
            memcpy(coordinates + 3 * i, x + 3 * (size_t)nodes[i], 3 * sizeof(double));
        memset(element, 0, sizeof(double) * (size_t)n_entries);
        tabulate(element, coefficients + (size_t)e * coefficient_stride, constants, coordinates, NULL, NULL);
        const int32_t *target = positions + (size_t)e * n_entries;
        for (int32_t k = 0; k < n_entries; ++k) {
            if (target[k] >= 0)
                data[target[k]] += element[k];
            else if (target[k] <= -2)
                border[-2 - (int64_t)target[k]] += element[k];
        }
    }
    free(element);
    free(coordinates);
    return 0;
}
