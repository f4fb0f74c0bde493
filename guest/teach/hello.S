/*
 * vmlab's teaching guest: the whole program a student reads (docs/LABS.md).
 *
 * Loaded by `vmlab run --raw target/guest/teach/hello.bin --mode real` at
 * guest-physical 0x1000 and entered in 16-bit real mode with CS = 0 and
 * IP = 0x1000, as a PC's BIOS would enter a boot sector. It
 *   1. writes a greeting to the serial port COM1 (port 0x3f8): one VM exit
 *      to vmlab per byte (KVM_EXIT_IO, out),
 *   2. switches to 32-bit protected mode with a flat GDT (no exits: all of
 *      it happens inside the CPU),
 *   3. writes and then reads the MMIO address 0xc0000000, which no device
 *      owns: two KVM_EXIT_MMIO exits (write, read); vmlab ignores the write
 *      and answers the read with all ones,
 *   4. runs CPUID leaf 0 (handled inside KVM: no exit to vmlab) and prints
 *      the vendor string vmlab configured, e.g. "GenuineIntel",
 *   5. reports exit status 0 on vmlab's status port 0xf5, which ends the VM.
 * The exits vmlab sees are therefore exactly: one io_out to 0x3f8 per byte
 * printed, one mmio_write and one mmio_read at 0xc0000000, one io_out to
 * 0xf5; tests/labs.rs counts them with --trace-exits.
 *
 * Build: scripts/build-teach-guest.sh (GNU as and ld from binutils).
 */
        .code16
        .section .text
        .globl  _start
_start:
        cli
        xor     %ax, %ax
        mov     %ax, %ds
        mov     %ax, %es
        mov     %ax, %ss
        mov     $0x1000, %sp            /* stack grows down below the code */

        /* 1. Port I/O in real mode. */
        mov     $greeting, %si
        call    puts16

        /* 2. Into protected mode: load the GDT, set CR0.PE, far jump. */
        lgdt    gdt_descriptor
        mov     %cr0, %eax
        or      $1, %eax
        mov     %eax, %cr0
        ljmp    $0x08, $protected

puts16:                                 /* print the NUL-terminated %si */
        mov     $0x3f8, %dx
1:      lodsb
        test    %al, %al
        jz      2f
        out     %al, %dx
        jmp     1b
2:      ret

        .code32
protected:
        mov     $0x10, %ax              /* flat 4 GiB data segment */
        mov     %ax, %ds
        mov     %ax, %es
        mov     %ax, %ss
        mov     $0x1000, %esp
        mov     $in_protected, %esi
        call    puts32

        /* 3. MMIO: a store and a load at an address with no RAM behind it. */
        movl    $0x12345678, 0xc0000000
        movl    0xc0000000, %eax
        mov     %eax, mmio_value

        /* 4. CPUID leaf 0: the vendor string in EBX, EDX, ECX. */
        xor     %eax, %eax
        cpuid
        mov     %ebx, vendor
        mov     %edx, vendor + 4
        mov     %ecx, vendor + 8
        mov     $cpuid_says, %esi
        call    puts32
        mov     $vendor, %esi
        call    puts32
        mov     $newline, %esi
        call    puts32

        /* 5. Tell vmlab we are done: exit status 0 on port 0xf5. */
        xor     %al, %al
        out     %al, $0xf5
halt:   hlt                             /* not reached: vmlab stops the VM */
        jmp     halt

puts32:                                 /* print the NUL-terminated %esi */
        mov     $0x3f8, %dx
1:      lodsb
        test    %al, %al
        jz      2f
        out     %al, %dx
        jmp     1b
2:      ret

        /* Data, in the same section: the image is one contiguous block. */
        .p2align 3
gdt:    .quad   0                       /* the null descriptor */
        .quad   0x00cf9a000000ffff      /* 0x08: code, base 0, 4 GiB, 32-bit */
        .quad   0x00cf92000000ffff      /* 0x10: data, base 0, 4 GiB */
gdt_descriptor:
        .word   gdt_descriptor - gdt - 1
        .long   gdt
greeting:
        .asciz  "hello from real mode\n"
in_protected:
        .asciz  "now in 32-bit protected mode\n"
cpuid_says:
        .asciz  "cpuid vendor: "
newline:
        .asciz  "\n"
vendor: .space  13                      /* 12 characters and a NUL */
mmio_value:
        .long   0
