/* The tutorial's hello-world job as a Slurm job: prints "hello world"
 * every 10 seconds until it is killed (like examples/jobs/hello_world.aurora).
 * Built by the devtools machine of topologies/slurm.toml into dist/. */
#include <stdio.h>
#include <unistd.h>

int main(void)
{
    /* Slurm writes stdout to a file: flush each line so it shows at once. */
    setvbuf(stdout, NULL, _IOLBF, 0);
    for (;;) {
        printf("hello world\n");
        sleep(10);
    }
}
