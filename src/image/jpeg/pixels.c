/*
 * Pixels from DCT coefficients decoded elsewhere (progressive.rs), by
 * libjpeg-turbo's own inverse DCT, upsampling and colour conversion, so
 * they are the pixels libjpeg-turbo would give for the whole file.
 *
 * libjpeg reads the file's header made into a sequential one (one scan of
 * every component), and its entropy decoder's decode_mcu is replaced by a
 * copy of each MCU's blocks from the planes: the rest of the decoder runs
 * as for any sequential JPEG. The settings are those of tj3Decompress8 for
 * RGB output (turbojpeg-mp.c).
 */

#include <setjmp.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "jpeglib.h"

/* The head of libjpeg's entropy decoder (jpegint.h of the libjpeg-turbo
 * 3.1.0 that turbojpeg-sys 1.2 bundles; the same since libjpeg 6): only
 * decode_mcu is replaced. A turbojpeg-sys update must check it. */
struct entropy_head {
  void (*start_pass)(j_decompress_ptr cinfo);
  boolean (*decode_mcu)(j_decompress_ptr cinfo, JBLOCKROW *MCU_data);
};

/* As the Rust side lays it out (pixels.rs, Planes). */
struct planes {
  const JCOEF *blocks[4];
  size_t blocks_per_row[4];
  size_t rows[4];
  int components;
};

struct session {
  struct jpeg_error_mgr error; /* first: libjpeg passes it as cinfo->err */
  jmp_buf escape;
  const struct planes *planes;
  size_t next_mcu;
  char message[JMSG_LENGTH_MAX];
};

static void give_up(j_common_ptr cinfo)
{
  struct session *session = (struct session *)cinfo->err;
  (*cinfo->err->format_message)(cinfo, session->message);
  longjmp(session->escape, 1);
}

/* A warning would have failed the decode through turbojpeg too. */
static void on_message(j_common_ptr cinfo, int level)
{
  if (level < 0) give_up(cinfo);
}

static boolean copy_mcu(j_decompress_ptr cinfo, JBLOCKROW *mcu)
{
  struct session *session = (struct session *)cinfo->err;
  const struct planes *planes = session->planes;
  size_t row = session->next_mcu / cinfo->MCUs_per_row;
  size_t column = session->next_mcu % cinfo->MCUs_per_row;
  int n = 0;
  session->next_mcu++;
  for (int i = 0; i < cinfo->comps_in_scan; i++) {
    const jpeg_component_info *component = cinfo->cur_comp_info[i];
    int c = component->component_index;
    for (int y = 0; y < component->MCU_height; y++) {
      size_t block_row = row * (size_t)component->MCU_height + (size_t)y;
      for (int x = 0; x < component->MCU_width; x++) {
        size_t block_column = column * (size_t)component->MCU_width + (size_t)x;
        /* The planes' bounds, which Rust checked against their lengths. */
        if (c < 0 || c >= planes->components || block_row >= planes->rows[c] ||
            block_column >= planes->blocks_per_row[c] || n >= cinfo->blocks_in_MCU) {
          snprintf(session->message, JMSG_LENGTH_MAX, "an MCU outside the coefficients");
          longjmp(session->escape, 1);
        }
        memcpy(mcu[n++], planes->blocks[c] + (block_row * planes->blocks_per_row[c] + block_column) * DCTSIZE2,
               sizeof(JBLOCK));
      }
    }
  }
  return TRUE;
}

/* 0, or -1 with the reason in message. pixels holds width * height * 3. */
int classifier_pixels_from_coefficients(const unsigned char *header, unsigned long header_length,
                                        const struct planes *planes, unsigned int scale_denom,
                                        unsigned char *pixels, size_t width, size_t height, char *message,
                                        size_t message_length)
{
  struct jpeg_decompress_struct cinfo;
  struct session session;
  memset(&session, 0, sizeof(session));
  session.planes = planes;
  cinfo.err = jpeg_std_error(&session.error);
  session.error.error_exit = give_up;
  session.error.emit_message = on_message;
  if (setjmp(session.escape)) {
    jpeg_destroy_decompress(&cinfo);
    snprintf(message, message_length, "%s", session.message);
    return -1;
  }
  jpeg_create_decompress(&cinfo);
  jpeg_mem_src(&cinfo, header, header_length);
  /* As tj3DecompressHeader does: an ICC profile it cannot put together is a
   * warning, which sends the file elsewhere. Every APP2 segment before the
   * first scan is in the header. */
  jpeg_save_markers(&cinfo, JPEG_APP0 + 2, 0xFFFF);
  jpeg_read_header(&cinfo, TRUE);
  {
    JOCTET *icc = NULL;
    unsigned int icc_length = 0;
    if (jpeg_read_icc_profile(&cinfo, &icc, &icc_length)) free(icc);
  }
  if (cinfo.progressive_mode || cinfo.arith_code || cinfo.data_precision != 8 ||
      cinfo.num_components != planes->components || cinfo.comps_in_scan != planes->components) {
    snprintf(session.message, JMSG_LENGTH_MAX, "a header unlike the file's");
    longjmp(session.escape, 1);
  }
  if (cinfo.jpeg_color_space != JCS_YCbCr && cinfo.jpeg_color_space != JCS_GRAYSCALE &&
      cinfo.jpeg_color_space != JCS_RGB) {
    snprintf(session.message, JMSG_LENGTH_MAX, "colour space %d", (int)cinfo.jpeg_color_space);
    longjmp(session.escape, 1);
  }
  cinfo.out_color_space = JCS_EXT_RGB;
  cinfo.dct_method = JDCT_ISLOW;
  cinfo.do_fancy_upsampling = TRUE;
  cinfo.scale_num = 1;
  cinfo.scale_denom = scale_denom;
  jpeg_start_decompress(&cinfo);
  if (cinfo.output_width != width || cinfo.output_height != height || cinfo.output_components != 3) {
    snprintf(session.message, JMSG_LENGTH_MAX, "%ux%u pixels where %zux%zu were due", cinfo.output_width,
             cinfo.output_height, width, height);
    longjmp(session.escape, 1);
  }
  ((struct entropy_head *)cinfo.entropy)->decode_mcu = copy_mcu;
  while (cinfo.output_scanline < cinfo.output_height) {
    JSAMPROW rows[16];
    JDIMENSION count = 0;
    while (count < 16 && cinfo.output_scanline + count < cinfo.output_height) {
      rows[count] = pixels + (size_t)(cinfo.output_scanline + count) * width * 3;
      count++;
    }
    jpeg_read_scanlines(&cinfo, rows, count);
  }
  jpeg_destroy_decompress(&cinfo);
  return 0;
}
